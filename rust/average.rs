//! Per-key weighted averaging of gradient maps from many nodes.
//!
//! For every key in the union of the updates' keys (in order of first appearance) the result
//! is `sum(w_i * x_i) / sum(w_i)` over the updates that carry a non-empty value for the key,
//! computed by one specified sequence of float64 operations, the contract both backends
//! follow bit for bit: for each element, `acc = 0.0`, then for each carrier in update order
//! `acc = acc + (w_i * x_i)` (a rounded product, then a rounded sum: no fused multiply-add, no
//! reordering across nodes), and the result is `acc / W`, where `W` is the carriers' weights
//! summed in update order from `0.0`.
//!
//! The output is produced in one fused pass: for each cache-sized block of an output, every
//! carrier's block is added in and the block divided by `W` while it stays in cache, so the
//! result's memory is written once. Large inputs are split across threads by element range;
//! each element's sum over the nodes stays in update order. On x86-64 CPUs with AVX2 the same
//! loops run four lanes at a time (each lane rounds as the scalar code does; Rust never fuses
//! a multiply and an add).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::thread;

use crate::array::{Array, ArrayData};
use crate::error::AverageError;
use crate::key::Key;

/// One node's gradient map.
#[derive(Clone, Debug)]
pub struct NodeUpdate<'a> {
    /// Names the node in error messages.
    pub label: String,
    /// `(key, value)` pairs in the map's order.
    pub entries: Vec<(Key<'a>, Array<'a>)>,
}

/// The average for one key.
#[derive(Clone, Debug, PartialEq)]
pub struct Average {
    /// Index of the update where the key first appears.
    pub node: usize,
    /// Index of the key's entry in that update.
    pub entry: usize,
    /// Shape of the carriers' values; `[0]` when no update carries the key non-empty.
    pub shape: Vec<usize>,
    /// The averaged values, row-major.
    pub values: Vec<f64>,
}

/// Check the weights before any value is looked at, in the reference's order: an empty
/// update list, the weight count, each weight finite and non-negative, then their total
/// finite.
///
/// A finite total bounds every key's `W`: a sum of non-negative weights over fewer terms, in
/// the same order, rounds to no more than the total.
pub fn check_weights(weights: &[f64], updates: usize) -> Result<(), AverageError> {
    if updates == 0 {
        return Err(AverageError::EmptyUpdates);
    }
    if weights.len() != updates {
        return Err(AverageError::WeightCount {
            weights: weights.len(),
            updates,
        });
    }
    if let Some(index) = weights.iter().position(|w| !w.is_finite() || *w < 0.0) {
        return Err(AverageError::InvalidWeight {
            index,
            weight: weights[index],
        });
    }
    if sum_in_order(weights.iter().copied()).is_infinite() {
        return Err(AverageError::WeightsOverflow);
    }
    Ok(())
}

/// `0.0 + w_0 + w_1 + ...`, rounded after each addition.
fn sum_in_order(weights: impl Iterator<Item = f64>) -> f64 {
    weights.fold(0.0, |total, w| total + w)
}

/// Per-key weighted mean of `updates`, weighted by `weights` (one per update).
///
/// Keys come out in order of first appearance. Errors (in this order): those of
/// [`check_weights`]; then, key by key, different shapes for one key and all-zero weights.
pub fn weighted_average(
    updates: &[NodeUpdate<'_>],
    weights: &[f64],
) -> Result<Vec<Average>, AverageError> {
    average_on(updates, weights, None, accumulate)
}

/// Computes one [`WorkItem`].
type Kernel = fn(WorkItem<'_, '_>);

/// [`weighted_average`] on `threads` threads (`None`: as many as the input deserves), each
/// work item computed by `kernel`.
fn average_on(
    updates: &[NodeUpdate<'_>],
    weights: &[f64],
    threads: Option<usize>,
    kernel: Kernel,
) -> Result<Vec<Average>, AverageError> {
    check_weights(weights, updates.len())?;
    let groups = group_by_key(updates);
    let mut plans = Vec::with_capacity(groups.len());
    for group in &groups {
        plans.push(plan(group, updates, weights)?);
    }
    let mut outputs: Vec<Vec<f64>> = plans.iter().map(|p| vec![0.0; p.len]).collect();
    let threads = threads.unwrap_or_else(|| {
        let work: usize = plans.iter().map(|p| p.len * p.terms.len()).sum();
        if work >= PARALLEL_MIN_WORK {
            thread::available_parallelism().map_or(1, usize::from)
        } else {
            1
        }
    });
    let items = work_items(&plans, &mut outputs, threads);
    run(items, threads, kernel);
    Ok(groups
        .iter()
        .zip(plans)
        .zip(outputs)
        .map(|((group, plan), values)| Average {
            node: group.node,
            entry: group.entry,
            shape: plan.shape,
            values,
        })
        .collect())
}

/// The updates that mention one key.
struct Group<'u, 'a> {
    key: &'u Key<'a>,
    node: usize,
    entry: usize,
    /// `(update index, value)` for the updates that carry a non-empty value.
    carriers: Vec<(usize, &'u Array<'a>)>,
}

fn group_by_key<'u, 'a>(updates: &'u [NodeUpdate<'a>]) -> Vec<Group<'u, 'a>> {
    let mut index: HashMap<&Key<'_>, usize> = HashMap::new();
    let mut groups: Vec<Group<'u, 'a>> = Vec::new();
    for (node, update) in updates.iter().enumerate() {
        for (entry, (key, array)) in update.entries.iter().enumerate() {
            let slot = *index.entry(key).or_insert_with(|| {
                groups.push(Group {
                    key,
                    node,
                    entry,
                    carriers: Vec::new(),
                });
                groups.len() - 1
            });
            if !array.is_empty() {
                groups[slot].carriers.push((node, array));
            }
        }
    }
    groups
}

/// One carrier's contribution: `weight * values`.
struct Term<'t> {
    weight: f64,
    values: &'t ArrayData<'t>,
}

/// What to compute for one key.
struct Plan<'t> {
    shape: Vec<usize>,
    len: usize,
    terms: Vec<Term<'t>>,
    /// `W`, the carriers' weights summed in update order.
    total: f64,
}

/// Validate one key's carriers and turn them into terms.
fn plan<'t>(
    group: &Group<'t, '_>,
    updates: &[NodeUpdate<'_>],
    weights: &[f64],
) -> Result<Plan<'t>, AverageError> {
    let Some(&(first_node, first)) = group.carriers.first() else {
        return Ok(Plan {
            shape: vec![0],
            len: 0,
            terms: Vec::new(),
            total: 0.0,
        });
    };
    for &(node, array) in &group.carriers[1..] {
        if array.shape() != first.shape() {
            return Err(AverageError::ShapeMismatch {
                key: group.key.clone().into_owned(),
                label: updates[node].label.clone(),
                shape: array.shape().to_vec(),
                first_label: updates[first_node].label.clone(),
                first_shape: first.shape().to_vec(),
            });
        }
    }
    let total = sum_in_order(group.carriers.iter().map(|&(node, _)| weights[node]));
    if total == 0.0 {
        return Err(AverageError::ZeroWeights {
            key: group.key.clone().into_owned(),
        });
    }
    Ok(Plan {
        shape: first.shape().to_vec(),
        len: first.len(),
        terms: group
            .carriers
            .iter()
            .map(|&(node, array)| Term {
                weight: weights[node],
                values: array.data(),
            })
            .collect(),
        total,
    })
}

/// Elements of an output block (32 KiB) that stays in cache while every carrier is added in.
const BLOCK: usize = 4096;

/// Below this many multiply-adds in total, everything runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// The smallest piece of one output handed to a thread (256 KiB); smaller pieces cost more in
/// hand-over and lost cache locality than they gain.
const MIN_PIECE: usize = 1 << 15;

/// A range of one key's output, computed from the same range of every term.
struct WorkItem<'o, 't> {
    out: &'o mut [f64],
    offset: usize,
    plan: &'o Plan<'t>,
}

/// Split the outputs into items: one per key on one thread, else pieces small enough to
/// balance the threads (but at least [`MIN_PIECE`]).
fn work_items<'o, 't>(
    plans: &'o [Plan<'t>],
    outputs: &'o mut [Vec<f64>],
    threads: usize,
) -> Vec<WorkItem<'o, 't>> {
    let mut items = Vec::new();
    for (plan, out) in plans.iter().zip(outputs.iter_mut()) {
        if plan.len == 0 {
            continue;
        }
        let piece = if threads == 1 {
            plan.len
        } else {
            (plan.len / (threads * 4)).max(MIN_PIECE).div_ceil(BLOCK) * BLOCK
        };
        for (index, chunk) in out.chunks_mut(piece).enumerate() {
            items.push(WorkItem {
                out: chunk,
                offset: index * piece,
                plan,
            });
        }
    }
    items
}

fn run(items: Vec<WorkItem<'_, '_>>, threads: usize, kernel: Kernel) {
    if threads <= 1 || items.len() <= 1 {
        items.into_iter().for_each(kernel);
        return;
    }
    let queue = Mutex::new(items.into_iter());
    let next = || queue.lock().expect("no worker panics").next();
    let work = || {
        while let Some(item) = next() {
            kernel(item);
        }
    };
    thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
}

/// Compute one item, with the widest vector instructions the CPU has (lane by lane, so the
/// roundings are the same on every path).
fn accumulate(item: WorkItem<'_, '_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, just checked.
        return unsafe { accumulate_avx2(item) };
    }
    accumulate_blocks(item);
}

/// [`accumulate_blocks`] compiled for AVX2 (four doubles a lane-wise operation; no FMA).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(item: WorkItem<'_, '_>) {
    accumulate_blocks(item);
}

/// Compute one item block by block: add every term into the block in update order, dividing
/// by `W` as the last term is added. The first term starts from `0.0 + (w * x)` (as NumPy's
/// zeros-plus-product gives it, `-0.0` products included); Rust never fuses a product and a
/// sum into one rounding.
#[inline(always)]
fn accumulate_blocks(item: WorkItem<'_, '_>) {
    let Some((last, rest)) = item.plan.terms.split_last() else {
        return;
    };
    let total = item.plan.total;
    for (index, block) in item.out.chunks_mut(BLOCK).enumerate() {
        let start = item.offset + index * BLOCK;
        let range = start..start + block.len();
        let Some((first, middle)) = rest.split_first() else {
            combine(block, last.values, &range, |_, x| {
                (0.0 + last.weight * x) / total
            });
            continue;
        };
        combine(block, first.values, &range, |_, x| 0.0 + first.weight * x);
        for term in middle {
            combine(block, term.values, &range, |acc, x| acc + term.weight * x);
        }
        combine(block, last.values, &range, |acc, x| {
            (acc + last.weight * x) / total
        });
    }
}

/// `out[i] = step(out[i], x[i])` over `range` of `values`, each read as a double.
#[inline(always)]
fn combine(
    out: &mut [f64],
    values: &ArrayData<'_>,
    range: &Range<usize>,
    step: impl Fn(f64, f64) -> f64,
) {
    match values {
        ArrayData::F64(x) => zip_with(out, &x[range.clone()], step),
        ArrayData::F32(x) => zip_with(out, &x[range.clone()], step),
        ArrayData::I64(x) => zip_with(out, &x[range.clone()], step),
        ArrayData::U64(x) => zip_with(out, &x[range.clone()], step),
    }
}

#[inline(always)]
fn zip_with<T: Widen>(out: &mut [f64], x: &[T], step: impl Fn(f64, f64) -> f64) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = step(*o, v.widen());
    }
}

/// A value read as the double NumPy's `astype(float64)` gives it.
trait Widen: Copy {
    fn widen(self) -> f64;
}

impl Widen for f64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f64 {
        f64::from(self)
    }
}

/// Rust's `as` rounds to the nearest double, ties to even, as NumPy's cast does.
impl Widen for i64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
}

/// Rust's `as` rounds to the nearest double, ties to even, as NumPy's cast does.
impl Widen for u64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_array(shape: &[usize], values: Vec<f64>) -> Array<'static> {
        Array::new(shape.to_vec(), ArrayData::F64(values.into()))
    }

    fn update<'a>(label: &str, entries: Vec<(&'a str, Array<'a>)>) -> NodeUpdate<'a> {
        NodeUpdate {
            label: label.to_owned(),
            entries: entries
                .into_iter()
                .map(|(k, a)| (Key::from(k), a))
                .collect(),
        }
    }

    /// The specified sequence for one element, written out.
    fn specified(terms: &[(f64, f64)]) -> f64 {
        let mut acc = 0.0;
        let mut total = 0.0;
        for &(w, x) in terms {
            acc += w * x;
            total += w;
        }
        acc / total
    }

    #[test]
    fn weighted_mean_per_key_over_carriers_in_first_appearance_order() {
        let updates = vec![
            update("a", vec![("w", f64_array(&[2], vec![1.0, 2.0]))]),
            update(
                "b",
                vec![
                    ("bias", f64_array(&[], vec![4.0])),
                    ("w", f64_array(&[2], vec![3.0, 6.0])),
                ],
            ),
        ];
        let result = weighted_average(&updates, &[1.0, 3.0]).unwrap();
        assert_eq!(result.len(), 2);
        assert_eq!((result[0].node, result[0].entry), (0, 0));
        assert_eq!(result[0].shape, [2]);
        assert_eq!(result[0].values, [2.5, 5.0]);
        assert_eq!((result[1].node, result[1].entry), (1, 0));
        assert_eq!(result[1].shape, Vec::<usize>::new());
        assert_eq!(result[1].values, [4.0]);
    }

    #[test]
    fn the_sum_of_products_is_divided_by_the_total_weight() {
        // (0.0 + 3 * 0.1) / 3 is 0.10000000000000002, not 0.1: the contract's sequence, not
        // coefficients w / W (which would give 0.1 exactly).
        let updates = vec![update("a", vec![("w", f64_array(&[1], vec![0.1]))])];
        let result = weighted_average(&updates, &[3.0]).unwrap();
        assert_eq!(result[0].values, [specified(&[(3.0, 0.1)])]);
        assert_ne!(result[0].values, [0.1]);

        let values = [0.1, 0.7, -0.3];
        let weights = [0.3, 1e-3, 7.0];
        let updates: Vec<_> = values
            .iter()
            .map(|&x| update("n", vec![("w", f64_array(&[], vec![x]))]))
            .collect();
        let result = weighted_average(&updates, &weights).unwrap();
        let terms: Vec<_> = weights.iter().copied().zip(values).collect();
        assert_eq!(result[0].values[0].to_bits(), specified(&terms).to_bits());
    }

    #[test]
    fn empty_values_do_not_carry_a_key() {
        let updates = vec![
            update(
                "a",
                vec![
                    ("w", f64_array(&[0], vec![])),
                    ("e", f64_array(&[2, 0], vec![])),
                ],
            ),
            update("b", vec![("w", f64_array(&[1], vec![5.0]))]),
        ];
        let result = weighted_average(&updates, &[0.0, 2.0]).unwrap();
        assert_eq!(result[0].values, [5.0]);
        assert_eq!(result[1].shape, [0]);
        assert!(result[1].values.is_empty());
    }

    #[test]
    fn every_dtype_averages_as_its_doubles() {
        let floats = [0.1f32, 0.2, 0.3, 0.4];
        let ints = [i64::MIN, -1, 0, (1 << 53) + 1];
        let uints = [u64::MAX, 0, 1, (1 << 53) + 3];
        let updates = vec![
            update(
                "a",
                vec![("w", f64_array(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]))],
            ),
            update(
                "b",
                vec![(
                    "w",
                    Array::new(vec![2, 2], ArrayData::F32(floats[..].into())),
                )],
            ),
            update(
                "c",
                vec![("w", Array::new(vec![2, 2], ArrayData::I64(ints[..].into())))],
            ),
            update(
                "d",
                vec![(
                    "w",
                    Array::new(vec![2, 2], ArrayData::U64(uints[..].into())),
                )],
            ),
        ];
        let weights = [1.0, 0.5, 0.25, 2.0];
        let result = weighted_average(&updates, &weights).unwrap();
        for i in 0..4 {
            let xs = [
                [1.0, 2.0, 3.0, 4.0][i],
                f64::from(floats[i]),
                ints[i] as f64,
                uints[i] as f64,
            ];
            let terms: Vec<_> = weights.iter().copied().zip(xs).collect();
            assert_eq!(result[0].values[i].to_bits(), specified(&terms).to_bits());
        }
        // Ties round to even: 2^53 + 1 is halfway between 2^53 and 2^53 + 2.
        assert_eq!(ints[3] as f64, 9007199254740992.0);
    }

    #[test]
    fn threads_split_elements_without_reordering_the_sum_over_nodes() {
        let len = 3 * BLOCK * 17 + 5;
        let nodes = PARALLEL_MIN_WORK / len + 2;
        let data: Vec<Vec<f64>> = (0..nodes)
            .map(|n| {
                (0..len)
                    .map(|i| (((i * 31 + n * 7) % 101) as f64 - 50.0) / 7.0)
                    .collect()
            })
            .collect();
        let updates: Vec<NodeUpdate<'_>> = data
            .iter()
            .enumerate()
            .map(|(n, values)| {
                update(
                    &format!("n{n}"),
                    vec![("w", f64_array(&[len], values.clone()))],
                )
            })
            .collect();
        let weights: Vec<f64> = (0..nodes).map(|n| n as f64 / 3.0 + 0.5).collect();
        let threaded = average_on(&updates, &weights, Some(4), accumulate).unwrap();
        let single = average_on(&updates, &weights, Some(1), accumulate).unwrap();
        let chosen = weighted_average(&updates, &weights).unwrap();
        // The portable kernel, whatever vector instructions `accumulate` picks on this CPU.
        let portable = average_on(&updates, &weights, Some(1), accumulate_blocks).unwrap();
        assert_eq!(threaded, single);
        assert_eq!(chosen, single);
        assert_eq!(portable, single);
        for i in [0, 1, BLOCK, len / 2, len - 1] {
            let terms: Vec<_> = weights
                .iter()
                .copied()
                .zip(data.iter().map(|d| d[i]))
                .collect();
            assert_eq!(
                single[0].values[i].to_bits(),
                specified(&terms).to_bits(),
                "index {i}"
            );
        }
    }

    #[test]
    fn weight_errors_come_first() {
        assert_eq!(weighted_average(&[], &[]), Err(AverageError::EmptyUpdates));
        let one = vec![update("a", vec![("w", f64_array(&[1], vec![1.0]))])];
        assert_eq!(
            weighted_average(&one, &[1.0, 2.0]),
            Err(AverageError::WeightCount {
                weights: 2,
                updates: 1
            })
        );
        assert_eq!(
            weighted_average(&one, &[-1.0]),
            Err(AverageError::InvalidWeight {
                index: 0,
                weight: -1.0
            })
        );
        assert!(matches!(
            weighted_average(&one, &[f64::NAN]),
            Err(AverageError::InvalidWeight { index: 0, .. })
        ));
    }

    #[test]
    fn weights_whose_total_overflows_are_an_error() {
        let two = vec![
            update("a", vec![("w", f64_array(&[1], vec![1.0]))]),
            update("b", vec![("w", f64_array(&[1], vec![1.0]))]),
        ];
        assert_eq!(
            weighted_average(&two, &[1e308, 1e308]),
            Err(AverageError::WeightsOverflow)
        );
        assert_eq!(
            weighted_average(&two, &[f64::MAX, 0.0]).unwrap()[0].values,
            [1.0]
        );
    }

    #[test]
    fn shape_mismatch_names_the_key_and_both_nodes() {
        let updates = vec![
            update("node-a", vec![("w", f64_array(&[2], vec![1.0, 2.0]))]),
            update("node-b", vec![("w", f64_array(&[1, 2], vec![1.0, 2.0]))]),
        ];
        let error = weighted_average(&updates, &[1.0, 1.0]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "gradient 'w': shape (1, 2) from node-b does not match shape (2,) from node-a"
        );
    }

    #[test]
    fn all_zero_weights_for_a_key_name_the_key() {
        let updates = vec![
            update("a", vec![("w", f64_array(&[1], vec![1.0]))]),
            update("b", vec![("v", f64_array(&[1], vec![1.0]))]),
        ];
        let error = weighted_average(&updates, &[0.0, 1.0]).unwrap_err();
        assert_eq!(
            error,
            AverageError::ZeroWeights {
                key: Key::from("w").into_owned()
            }
        );
    }
}
