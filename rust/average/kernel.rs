//! The fused kernel of the weighted average: several carriers added into an output block in
//! one pass over it.
//!
//! For each block of [`BLOCK`] output elements ([`NARROW_BLOCK`] for a float32 or float16
//! result), the carriers are taken in update order, up to
//! [`FUSE`] at a time ([`SINGLE_FUSE`] float32 carriers; consecutive carriers of one element
//! type), and each element of the block goes through `acc = acc + w_i * x_i` for those
//! carriers in a register before it is stored again: the same roundings in the same order as
//! one carrier per pass, with a quarter (an eighth) of the loads and stores of the output.
//! The first pass over a block adds its carriers to `0.0` without reading the block (so a
//! scratch block is never cleared), and the last pass divides by `W` as it adds.

use std::mem;
use std::ops::Range;

use crate::array::{ArrayData, Element, F16};

/// Output elements per block (128 KiB), kept in the core's cache while every carrier is added.
pub(super) const BLOCK: usize = 16 * 1024;

/// Output elements per block of a float32 or float16 result (a 512 KiB float64 scratch block,
/// still within the core's cache): its carriers take 4 or 2 bytes an element, so each pass
/// over a longer block reads at least as many bytes of a carrier as a float64 carrier's pass
/// over [`BLOCK`] elements does, and the memory streams restart half as often per byte
/// (`benches/bench_dtypes.py`: float32 input read 0.86 of float64's GB/s with [`BLOCK`],
/// 0.95 with this).
pub(super) const NARROW_BLOCK: usize = 64 * 1024;

/// Carriers added to a block in one pass.
pub(super) const FUSE: usize = 4;

/// Float32 carriers added to a block in one pass: twice [`FUSE`], so a pass reads as many
/// bytes of carriers per element of the block as [`FUSE`] float64 carriers do
/// (`benches/bench_dtypes.py`: 2 to 4% more float32 GB/s than [`FUSE`] at a time, in 7 of 7
/// alternated runs).
pub(super) const SINGLE_FUSE: usize = 2 * FUSE;

/// One carrier's contribution: `weight * values`.
pub(super) struct Term<'t> {
    pub(super) weight: f64,
    pub(super) values: &'t ArrayData<'t>,
}

/// Split `terms` into runs of consecutive terms of one element type, of at most
/// [`SINGLE_FUSE`] float32 terms or [`FUSE`] terms of another type.
pub(super) fn fused_groups(terms: &[Term<'_>]) -> Vec<Range<usize>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    for (index, term) in terms.iter().enumerate() {
        match groups.last_mut() {
            Some(group)
                if group.len() < fuse_limit(term.values)
                    && mem::discriminant(terms[group.start].values)
                        == mem::discriminant(term.values) =>
            {
                group.end = index + 1;
            }
            _ => groups.push(index..index + 1),
        }
    }
    groups
}

/// The most terms of the type of `values` added in one pass.
fn fuse_limit(values: &ArrayData<'_>) -> usize {
    match values {
        ArrayData::F32(_) => SINGLE_FUSE,
        _ => FUSE,
    }
}

/// What an output block holds before the terms are added to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Start {
    /// Nothing to keep: the first pass adds its terms to `0.0` without reading the block.
    Zero,
    /// Running sums (of earlier folds) that the terms are added to.
    Sums,
}

/// Add every term into `out` (elements `offset..offset + out.len()` of the key) block by
/// block, from `start`, dividing by `total` as the last group is added.
#[inline(always)]
pub(super) fn accumulate(
    out: &mut [f64],
    offset: usize,
    terms: &[Term<'_>],
    groups: &[Range<usize>],
    total: f64,
    start: Start,
) {
    for (index, block) in out.chunks_mut(BLOCK).enumerate() {
        add_block(block, offset + index * BLOCK, terms, groups, total, start);
    }
}

/// Add every term into `block` (elements `first..first + block.len()` of the key), one group
/// per pass from `start`, dividing by `total` as the last group is added.
#[inline(always)]
fn add_block(
    block: &mut [f64],
    first: usize,
    terms: &[Term<'_>],
    groups: &[Range<usize>],
    total: f64,
    start: Start,
) {
    let last = groups.len().saturating_sub(1);
    for (index, group) in groups.iter().enumerate() {
        let divide = (index == last).then_some(total);
        let fresh = index == 0 && start == Start::Zero;
        add_group(block, first, &terms[group.clone()], divide, fresh);
    }
}

/// [`accumulate`] for a result narrower than float64: each block of [`NARROW_BLOCK`]
/// elements is computed in a float64 scratch block as [`accumulate`] computes a block, then
/// rounded once into `out` by `narrow`. `scratch` (the calling thread's, grown here when it is
/// shorter than a block) is never read before it is written.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn accumulate_into<N>(
    out: &mut [N],
    offset: usize,
    terms: &[Term<'_>],
    groups: &[Range<usize>],
    total: f64,
    scratch: &mut Vec<f64>,
    narrow: impl Fn(f64) -> N,
) {
    let needed = out.len().min(NARROW_BLOCK);
    if scratch.len() < needed {
        scratch.resize(needed, 0.0);
    }
    for (index, block) in out.chunks_mut(NARROW_BLOCK).enumerate() {
        let acc = &mut scratch[..block.len()];
        add_block(
            acc,
            offset + index * NARROW_BLOCK,
            terms,
            groups,
            total,
            Start::Zero,
        );
        for (o, &x) in block.iter_mut().zip(acc.iter()) {
            *o = narrow(x);
        }
    }
}

/// Add 1 to [`SINGLE_FUSE`] terms of one element type into `out`, from element `start` of each;
/// the `first` group of a block adds them to `0.0` instead of reading `out`.
#[inline(always)]
fn add_group(out: &mut [f64], start: usize, terms: &[Term<'_>], divide: Option<f64>, first: bool) {
    match terms[0].values {
        ArrayData::F64(_) => add_typed::<f64>(out, start, terms, divide, first),
        ArrayData::F32(_) => add_typed::<f32>(out, start, terms, divide, first),
        ArrayData::F16(_) => add_typed::<F16>(out, start, terms, divide, first),
        ArrayData::I64(_) => add_typed::<i64>(out, start, terms, divide, first),
        ArrayData::U64(_) => add_typed::<u64>(out, start, terms, divide, first),
    }
}

#[inline(always)]
fn add_typed<T: Element>(
    out: &mut [f64],
    start: usize,
    terms: &[Term<'_>],
    divide: Option<f64>,
    first: bool,
) {
    if first {
        add_counted::<T, true>(out, start, terms, divide);
    } else {
        add_counted::<T, false>(out, start, terms, divide);
    }
}

#[inline(always)]
fn add_counted<T: Element, const FIRST: bool>(
    out: &mut [f64],
    start: usize,
    terms: &[Term<'_>],
    divide: Option<f64>,
) {
    let range = start..start + out.len();
    match terms.len() {
        1 => fused::<T, 1, FIRST>(out, terms, range, divide),
        2 => fused::<T, 2, FIRST>(out, terms, range, divide),
        3 => fused::<T, 3, FIRST>(out, terms, range, divide),
        4 => fused::<T, 4, FIRST>(out, terms, range, divide),
        5 => fused::<T, 5, FIRST>(out, terms, range, divide),
        6 => fused::<T, 6, FIRST>(out, terms, range, divide),
        7 => fused::<T, 7, FIRST>(out, terms, range, divide),
        _ => fused::<T, SINGLE_FUSE, FIRST>(out, terms, range, divide),
    }
}

/// Output elements computed together: each carrier is read [`LANES`] elements at a time, so
/// that the loop over them is vectorised across elements (with no bounds check per element).
const LANES: usize = 8;

/// `out[i] = (((out[i] + w_0 x_0[i]) + w_1 x_1[i]) + ...)`, then `/ total` when dividing;
/// with `FIRST`, `0.0` stands for `out[i]`, which is not read (nor needs to be zero).
#[inline(always)]
fn fused<T: Element, const K: usize, const FIRST: bool>(
    out: &mut [f64],
    terms: &[Term<'_>],
    range: Range<usize>,
    divide: Option<f64>,
) {
    let xs: [&[T]; K] = std::array::from_fn(|k| &T::slice(terms[k].values)[range.clone()]);
    let ws: [f64; K] = std::array::from_fn(|k| terms[k].weight);
    let whole = out.len() - out.len() % LANES;
    let (body, tail) = out.split_at_mut(whole);
    for (chunk, o) in body.chunks_exact_mut(LANES).enumerate() {
        let start = chunk * LANES;
        let mut acc: [f64; LANES] = std::array::from_fn(|lane| if FIRST { 0.0 } else { o[lane] });
        for k in 0..K {
            let x: &[T; LANES] = xs[k][start..start + LANES].try_into().expect("LANES long");
            for lane in 0..LANES {
                acc[lane] += ws[k] * x[lane].widen();
            }
        }
        if let Some(total) = divide {
            for value in &mut acc {
                *value /= total;
            }
        }
        o.copy_from_slice(&acc);
    }
    for (i, o) in tail.iter_mut().enumerate() {
        let mut acc = if FIRST { 0.0 } else { *o };
        for k in 0..K {
            acc += ws[k] * xs[k][whole + i].widen();
        }
        *o = divide.map_or(acc, |total| acc / total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_runs_of_one_type_of_at_most_fuse_terms() {
        let f64s = ArrayData::F64(vec![1.0].into());
        let f32s = ArrayData::F32(vec![1.0].into());
        let term = |values| Term {
            weight: 1.0,
            values,
        };
        let terms: Vec<Term<'_>> = [
            &f64s, &f64s, &f32s, &f64s, &f64s, &f64s, &f64s, &f64s, &f64s,
        ]
        .into_iter()
        .map(term)
        .collect();
        assert_eq!(fused_groups(&terms), [0..2, 2..3, 3..7, 7..9]);
        let singles: Vec<Term<'_>> = [&f32s; 10].into_iter().map(term).collect();
        assert_eq!(fused_groups(&singles), [0..8, 8..10]);
        assert!(fused_groups(&[]).is_empty());
    }
}
