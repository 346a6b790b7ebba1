//! Criterion benchmarks of the hot paths on the pure Rust core (no Python needed).

use std::hint::black_box;

use aumai_fedtrain::array::Array;
use aumai_fedtrain::average::{weighted_average, NodeUpdate};
use aumai_fedtrain::hash::{canonical_hash, Value};
use aumai_fedtrain::key::Key;
use aumai_fedtrain::magnitude::max_abs;
use aumai_fedtrain::wire::wire_digest;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Deterministic gradient-like values: a xorshift stream scaled to about [-0.05, 0.05].
fn gradient_values(len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.1
        })
        .collect()
}

fn bench_hash(c: &mut Criterion) {
    let len = 1_000_000;
    let values = gradient_values(len, 7);
    let mut group = c.benchmark_group("canonical_hash");
    group.throughput(Throughput::Elements(len as u64));
    group.sample_size(20);
    group.bench_function("1e6 float64", |b| {
        b.iter(|| {
            let entries = vec![(Key::from("w"), Value::floats(&values[..]))];
            black_box(canonical_hash(entries))
        })
    });
    group.finish();
}

fn bench_average(c: &mut Criterion) {
    let mut group = c.benchmark_group("weighted_average");
    group.sample_size(10);
    for (nodes, len) in [(10, 1_000_000), (100, 10_000), (100, 1_000_000)] {
        let data: Vec<Vec<f64>> = (0..nodes)
            .map(|n| gradient_values(len, n as u64 + 1))
            .collect();
        let updates: Vec<NodeUpdate<'_>> = data
            .iter()
            .enumerate()
            .map(|(n, values)| NodeUpdate {
                label: format!("node-{n}"),
                entries: vec![(Key::from("w"), Array::floats(&values[..]))],
            })
            .collect();
        let weights: Vec<f64> = (0..nodes).map(|n| (n + 1) as f64).collect();
        group.throughput(Throughput::Elements((nodes * len) as u64));
        group.bench_with_input(
            BenchmarkId::new("float64", format!("{nodes}x{len}")),
            &updates,
            |b, updates| b.iter(|| black_box(weighted_average(updates, &weights).unwrap())),
        );
    }
    group.finish();
}

fn bench_wire_digest_and_scan(c: &mut Criterion) {
    let len = 1_000_000;
    let values = gradient_values(len, 11);
    let mut group = c.benchmark_group("bytes");
    group.throughput(Throughput::Bytes((len * 8) as u64));
    group.sample_size(20);
    group.bench_function("wire_digest 1e6 float64", |b| {
        b.iter(|| {
            black_box(wire_digest(vec![(
                Key::from("w"),
                Array::floats(&values[..]),
            )]))
        })
    });
    let array = Array::floats(&values[..]);
    group.bench_function("max_abs 1e6 float64", |b| {
        b.iter(|| black_box(max_abs(&[&array])))
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_hash,
    bench_average,
    bench_wire_digest_and_scan
);
criterion_main!(benches);
