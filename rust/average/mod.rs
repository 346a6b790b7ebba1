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
//! The result keeps the inputs' precision: the carriers of a key that are all float16, or all
//! float32, or float16 and float32, give the widest of them, rounded once (to nearest, ties to
//! even) from the float64 result; any float64, integer or list carrier gives float64.
//!
//! The output is produced in one fused pass ([`kernel`]): block by cache-sized block, several
//! carriers at a time are added in while the block stays in cache, so the result's memory is
//! written once (a float32 or float16 result through a float64 block, each block rounded into
//! the result as it is done: no float64 copy of the whole result is made). Large inputs are split across threads by work: large keys by element range,
//! small keys whole, each element's sum over the nodes staying in update order.
//!
//! [`WeightedSum`] computes the same result fold by fold as updates arrive (one float64
//! accumulator per key, the updates not kept), with the same kernel and the same bits.

mod dequant;
mod kernel;
mod running;

use std::collections::HashMap;

use crate::array::{Array, ArrayData, F16};
use crate::error::AverageError;
use crate::key::Key;
use crate::{parallel, simd};
pub use dequant::{add_encoded, dequantise_average, Codes, DequantError, Levels};
use kernel::{fused_groups, Start, Term};
pub use running::{EncodedEntry, EncodedUpdate, FoldEncodedError, WeightedSum};

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
    /// The averaged values, row-major, in the carriers' widest float type (see the module).
    pub values: ArrayData<'static>,
}

/// The float types a result can take, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// float16.
    Half,
    /// float32.
    Single,
    /// float64.
    Double,
}

impl Precision {
    /// The precision of a result that `data` contributes to.
    fn of(data: &ArrayData<'_>) -> Self {
        match data {
            ArrayData::F16(_) => Precision::Half,
            ArrayData::F32(_) => Precision::Single,
            ArrayData::F64(_) | ArrayData::I64(_) | ArrayData::U64(_) => Precision::Double,
        }
    }

    /// The widest precision of `terms` (float64 for none).
    fn widest(terms: &[Term<'_>]) -> Self {
        terms
            .iter()
            .map(|term| Precision::of(term.values))
            .max()
            .unwrap_or(Precision::Double)
    }

    /// `len` zeros of this precision: a result to fill.
    fn zeros(self, len: usize) -> ArrayData<'static> {
        match self {
            Precision::Double => ArrayData::F64(vec![0.0; len].into()),
            Precision::Single => ArrayData::F32(vec![0.0; len].into()),
            Precision::Half => ArrayData::F16(vec![F16::default(); len].into()),
        }
    }
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
    check_more_weights(weights, updates, 0, 0.0).map(|_| ())
}

/// Check the weights of `updates` updates that follow `before` others whose weights sum to
/// `total` (the weight count, each weight finite and non-negative, the new total finite;
/// errors number the weights from `before`) and return the new total.
fn check_more_weights(
    weights: &[f64],
    updates: usize,
    before: usize,
    total: f64,
) -> Result<f64, AverageError> {
    if weights.len() != updates {
        return Err(AverageError::WeightCount {
            weights: weights.len(),
            updates,
        });
    }
    if let Some(index) = weights.iter().position(|w| !w.is_finite() || *w < 0.0) {
        return Err(AverageError::InvalidWeight {
            index: before + index,
            weight: weights[index],
        });
    }
    let total = sum_from(total, weights.iter().copied());
    if total.is_infinite() {
        return Err(AverageError::WeightsOverflow);
    }
    Ok(total)
}

/// `total + w_0 + w_1 + ...`, rounded after each addition.
fn sum_from(total: f64, weights: impl Iterator<Item = f64>) -> f64 {
    weights.fold(total, |total, w| total + w)
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
type Kernel = fn(WorkItem<'_, '_>, &mut Vec<f64>);

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
    // Every key's shapes before any key's weights, as a fold of a running sum finds them.
    for group in &groups {
        if let Some(&(first_node, first)) = group.carriers.first() {
            check_shapes(group, updates, &updates[first_node].label, first.shape())?;
        }
    }
    let mut plans = Vec::with_capacity(groups.len());
    for group in &groups {
        plans.push(plan(group, weights)?);
    }
    let mut outputs: Vec<ArrayData<'static>> =
        plans.iter().map(|p| p.precision.zeros(p.len)).collect();
    let threads =
        threads.unwrap_or_else(|| parallel::threads_for(plans.iter().map(Plan::work).sum()));
    let items = work_items(&plans, &mut outputs, threads);
    parallel::for_each_with(items, threads, Vec::new, |scratch, item| {
        kernel(item, scratch)
    });
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

/// What to compute for one key.
struct Plan<'t> {
    shape: Vec<usize>,
    len: usize,
    terms: Vec<Term<'t>>,
    /// The terms, in runs that the kernel adds in one pass.
    groups: Vec<std::ops::Range<usize>>,
    /// `W`, the carriers' weights summed in update order.
    total: f64,
    /// The result's float type: the carriers' widest.
    precision: Precision,
}

impl Plan<'_> {
    /// Multiply-adds to compute.
    fn work(&self) -> usize {
        self.len * self.terms.len()
    }
}

/// Turn one key's carriers (their shapes checked) into terms; an error when their weights
/// are all zero.
fn plan<'t>(group: &Group<'t, '_>, weights: &[f64]) -> Result<Plan<'t>, AverageError> {
    let Some(&(_, first)) = group.carriers.first() else {
        return Ok(Plan {
            shape: vec![0],
            len: 0,
            terms: Vec::new(),
            groups: Vec::new(),
            total: 0.0,
            precision: Precision::Double,
        });
    };
    let total = sum_from(0.0, group.carriers.iter().map(|&(node, _)| weights[node]));
    if total == 0.0 {
        return Err(AverageError::ZeroWeights {
            key: group.key.clone().into_owned(),
        });
    }
    Ok(terms_plan(group, weights, first.shape().to_vec(), total))
}

/// A [`AverageError::ShapeMismatch`] for the first carrier of `group` whose shape is not
/// `first_shape`, the shape of the key's first carrier (from `first_label`).
fn check_shapes(
    group: &Group<'_, '_>,
    updates: &[NodeUpdate<'_>],
    first_label: &str,
    first_shape: &[usize],
) -> Result<(), AverageError> {
    for &(node, array) in &group.carriers {
        if array.shape() != first_shape {
            return Err(AverageError::ShapeMismatch {
                key: group.key.clone().into_owned(),
                label: updates[node].label.clone(),
                shape: array.shape().to_vec(),
                first_label: first_label.to_owned(),
                first_shape: first_shape.to_vec(),
            });
        }
    }
    Ok(())
}

/// The terms of `group`'s carriers (checked to have `shape`), in fused groups, to be
/// divided by `total`.
fn terms_plan<'t>(
    group: &Group<'t, '_>,
    weights: &[f64],
    shape: Vec<usize>,
    total: f64,
) -> Plan<'t> {
    let terms: Vec<Term<'t>> = group
        .carriers
        .iter()
        .map(|&(node, array)| Term {
            weight: weights[node],
            values: array.data(),
        })
        .collect();
    Plan {
        len: shape.iter().product(),
        shape,
        groups: fused_groups(&terms),
        precision: Precision::widest(&terms),
        terms,
        total,
    }
}

/// Output elements handed to a thread come in multiples of this (a whole number of cache
/// lines of the output, so that no two threads write one line).
const ALIGN: usize = 64;

/// A range of one key's output, computed from the same range of every term.
struct WorkItem<'o, 't> {
    out: Out<'o>,
    offset: usize,
    plan: &'o Plan<'t>,
}

/// A range of a result, in the result's float type.
enum Out<'o> {
    F64(&'o mut [f64]),
    F32(&'o mut [f32]),
    F16(&'o mut [F16]),
}

impl<'o> Out<'o> {
    /// The whole of a result made by [`Precision::zeros`].
    fn of(result: &'o mut ArrayData<'static>) -> Self {
        match result {
            ArrayData::F64(values) => Out::F64(values.to_mut()),
            ArrayData::F32(values) => Out::F32(values.to_mut()),
            ArrayData::F16(values) => Out::F16(values.to_mut()),
            ArrayData::I64(_) | ArrayData::U64(_) => unreachable!("results are floats"),
        }
    }

    /// The first `mid` elements and the rest.
    fn split_at(self, mid: usize) -> (Self, Self) {
        match self {
            Out::F64(values) => {
                let (head, tail) = values.split_at_mut(mid);
                (Out::F64(head), Out::F64(tail))
            }
            Out::F32(values) => {
                let (head, tail) = values.split_at_mut(mid);
                (Out::F32(head), Out::F32(tail))
            }
            Out::F16(values) => {
                let (head, tail) = values.split_at_mut(mid);
                (Out::F16(head), Out::F16(tail))
            }
        }
    }
}

/// Split the outputs into items: whole keys on one thread; else, by work (elements times
/// carriers), keys split into ranges and small keys whole, so that the threads share the work
/// evenly whether the model has one large tensor or hundreds of small ones.
fn work_items<'o, 't>(
    plans: &'o [Plan<'t>],
    outputs: &'o mut [ArrayData<'static>],
    threads: usize,
) -> Vec<WorkItem<'o, 't>> {
    let total: usize = plans.iter().map(Plan::work).sum();
    let mut items = Vec::new();
    for (plan, out) in plans.iter().zip(outputs.iter_mut()) {
        let mut rest = Out::of(out);
        for range in parallel::pieces(plan.len, plan.terms.len(), total, threads, ALIGN) {
            let (piece, tail) = rest.split_at(range.len());
            rest = tail;
            items.push(WorkItem {
                out: piece,
                offset: range.start,
                plan,
            });
        }
    }
    items
}

/// Compute one item, with the widest vector instructions the CPU has; `scratch` is the
/// thread's float64 block for narrow results.
fn accumulate(item: WorkItem<'_, '_>, scratch: &mut Vec<f64>) {
    simd::dispatch(
        #[inline(always)]
        || accumulate_portable(item, scratch),
    );
}

/// Compute one item with the baseline instructions (what [`accumulate`] does without AVX2).
#[inline(always)]
fn accumulate_portable(item: WorkItem<'_, '_>, scratch: &mut Vec<f64>) {
    let plan = item.plan;
    let (offset, terms, groups, total) = (item.offset, &plan.terms, &plan.groups[..], plan.total);
    match item.out {
        Out::F64(out) => kernel::accumulate(out, offset, terms, groups, total, Start::Zero),
        Out::F32(out) => {
            kernel::accumulate_into(out, offset, terms, groups, total, scratch, |x| x as f32)
        }
        Out::F16(out) => {
            kernel::accumulate_into(out, offset, terms, groups, total, scratch, F16::from_f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::ArrayData;
    use crate::parallel::PARALLEL_MIN_WORK;
    use kernel::{BLOCK, NARROW_BLOCK};

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

    /// Element `i` of `data` as a double.
    fn element(data: &ArrayData<'_>, i: usize) -> f64 {
        match data {
            ArrayData::F64(d) => d[i],
            ArrayData::F32(d) => f64::from(d[i]),
            ArrayData::F16(d) => d[i].to_f64(),
            ArrayData::I64(d) => d[i] as f64,
            ArrayData::U64(d) => d[i] as f64,
        }
    }

    /// The values of a float64 result.
    fn doubles(average: &Average) -> &[f64] {
        match &average.values {
            ArrayData::F64(values) => values,
            other => panic!("expected a float64 result, got {other:?}"),
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
        assert_eq!(doubles(&result[0]), [2.5, 5.0]);
        assert_eq!((result[1].node, result[1].entry), (1, 0));
        assert_eq!(result[1].shape, Vec::<usize>::new());
        assert_eq!(doubles(&result[1]), [4.0]);
    }

    #[test]
    fn the_sum_of_products_is_divided_by_the_total_weight() {
        // (0.0 + 3 * 0.1) / 3 is 0.10000000000000002, not 0.1: the contract's sequence, not
        // coefficients w / W (which would give 0.1 exactly).
        let updates = vec![update("a", vec![("w", f64_array(&[1], vec![0.1]))])];
        let result = weighted_average(&updates, &[3.0]).unwrap();
        assert_eq!(doubles(&result[0]), [specified(&[(3.0, 0.1)])]);
        assert_ne!(doubles(&result[0]), [0.1]);

        let values = [0.1, 0.7, -0.3];
        let weights = [0.3, 1e-3, 7.0];
        let updates: Vec<_> = values
            .iter()
            .map(|&x| update("n", vec![("w", f64_array(&[], vec![x]))]))
            .collect();
        let result = weighted_average(&updates, &weights).unwrap();
        let terms: Vec<_> = weights.iter().copied().zip(values).collect();
        assert_eq!(
            doubles(&result[0])[0].to_bits(),
            specified(&terms).to_bits()
        );
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
        assert_eq!(doubles(&result[0]), [5.0]);
        assert_eq!(result[1].shape, [0]);
        assert!(doubles(&result[1]).is_empty());
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
            assert_eq!(
                doubles(&result[0])[i].to_bits(),
                specified(&terms).to_bits()
            );
        }
        // Ties round to even: 2^53 + 1 is halfway between 2^53 and 2^53 + 2.
        assert_eq!(ints[3] as f64, 9007199254740992.0);
    }

    #[test]
    fn the_result_takes_the_carriers_widest_float_type_rounded_once() {
        let halves = ArrayData::F16(vec![F16::from_f64(0.1), F16::from_f64(-3.0)].into());
        let singles = ArrayData::F32(vec![0.7f32, 1e-3].into());
        let doubles = ArrayData::F64(vec![0.3, 2.5].into());
        let ints = ArrayData::I64(vec![1, -2].into());
        let average = |carriers: &[&ArrayData<'static>]| {
            let updates: Vec<_> = carriers
                .iter()
                .map(|&data| update("n", vec![("w", Array::new(vec![2], data.clone()))]))
                .collect();
            let weights: Vec<f64> = (0..carriers.len()).map(|n| 1.0 + n as f64 / 3.0).collect();
            let result = weighted_average(&updates, &weights).unwrap().remove(0);
            let terms = |i: usize| -> Vec<(f64, f64)> {
                weights
                    .iter()
                    .zip(carriers)
                    .map(|(&w, data)| (w, element(data, i)))
                    .collect()
            };
            let exact: Vec<f64> = (0..2).map(|i| specified(&terms(i))).collect();
            (result.values, exact)
        };
        let (values, exact) = average(&[&halves, &halves]);
        let rounded: Vec<F16> = exact.iter().map(|&x| F16::from_f64(x)).collect();
        assert_eq!(values, ArrayData::F16(rounded.into()));
        let (values, exact) = average(&[&singles, &halves]);
        assert_eq!(
            values,
            ArrayData::F32(vec![exact[0] as f32, exact[1] as f32].into())
        );
        let (values, exact) = average(&[&halves, &singles, &doubles]);
        assert_eq!(values, ArrayData::F64(exact.into()));
        let (values, exact) = average(&[&halves, &ints]);
        assert_eq!(values, ArrayData::F64(exact.into()));
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
        let portable = average_on(&updates, &weights, Some(1), accumulate_portable).unwrap();
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
                doubles(&single[0])[i].to_bits(),
                specified(&terms).to_bits(),
                "index {i}"
            );
        }
    }

    #[test]
    fn narrow_results_are_split_across_threads_block_by_block() {
        // A float32 key and a float16 key of several blocks, carried by enough nodes to be
        // split across threads: the threads' pieces round exactly as one thread does.
        let len = 2 * NARROW_BLOCK + 77;
        let nodes = PARALLEL_MIN_WORK / len + 3;
        let x = |n: usize, i: usize| (((i * 13 + n * 5) % 89) as f64 - 44.0) / 9.0;
        let singles: Vec<Vec<f32>> = (0..nodes)
            .map(|n| (0..len).map(|i| x(n, i) as f32).collect())
            .collect();
        let halves: Vec<Vec<F16>> = (0..nodes)
            .map(|n| (0..len).map(|i| F16::from_f64(x(n, i))).collect())
            .collect();
        let updates: Vec<NodeUpdate<'_>> = (0..nodes)
            .map(|n| NodeUpdate {
                label: format!("n{n}"),
                entries: vec![
                    (
                        Key::from("s"),
                        Array::new(vec![len], ArrayData::F32(singles[n][..].into())),
                    ),
                    (
                        Key::from("h"),
                        Array::new(vec![len], ArrayData::F16(halves[n][..].into())),
                    ),
                ],
            })
            .collect();
        let weights: Vec<f64> = (0..nodes).map(|n| 1.0 + n as f64 / 7.0).collect();
        let single = average_on(&updates, &weights, Some(1), accumulate).unwrap();
        assert_eq!(
            average_on(&updates, &weights, Some(3), accumulate).unwrap(),
            single
        );
        for i in [0, NARROW_BLOCK - 1, NARROW_BLOCK, len - 1] {
            let terms = |key: usize| -> Vec<(f64, f64)> {
                updates
                    .iter()
                    .zip(&weights)
                    .map(|(u, &w)| (w, element(u.entries[key].1.data(), i)))
                    .collect()
            };
            let (s, h) = (specified(&terms(0)), specified(&terms(1)));
            assert_eq!(element(&single[0].values, i), f64::from(s as f32));
            assert_eq!(element(&single[1].values, i), F16::from_f64(h).to_f64());
        }
        assert!(matches!(single[0].values, ArrayData::F32(_)));
        assert!(matches!(single[1].values, ArrayData::F16(_)));
    }

    /// Values of every element type for node `n`, key `k`: a deterministic mixture of
    /// magnitudes so that the order of the additions shows in the result's bits.
    fn mixed_value(n: usize, k: usize, len: usize) -> Array<'static> {
        let x = |i: usize| {
            let scale = [1e-8, 1.0, 3e5, 0.1][(i * 7 + n + k) % 4];
            ((((i * 31 + n * 17 + k * 5) % 97) as f64) - 48.0) / 7.0 * scale
        };
        let data = match (n + k) % 6 {
            0 | 1 => ArrayData::F64((0..len).map(x).collect::<Vec<_>>().into()),
            2 => ArrayData::F32((0..len).map(|i| x(i) as f32).collect::<Vec<_>>().into()),
            5 => ArrayData::F16(
                (0..len)
                    .map(|i| F16::from_f64(x(i) / 64.0))
                    .collect::<Vec<_>>()
                    .into(),
            ),
            3 => ArrayData::I64(
                (0..len)
                    .map(|i| (x(i) * 1e3) as i64)
                    .collect::<Vec<_>>()
                    .into(),
            ),
            _ => ArrayData::U64(
                (0..len)
                    .map(|i| (x(i).abs() * 1e3) as u64)
                    .collect::<Vec<_>>()
                    .into(),
            ),
        };
        Array::new(vec![len], data)
    }

    #[test]
    fn fused_passes_and_key_splitting_keep_the_specified_sequence() {
        // Node counts around multiples of the fused group size, keys from one element to
        // several blocks, element types changing from node to node, on 1 to 3 threads.
        let lens = [1, 3, 65, 1000, BLOCK + 7, 2 * BLOCK + 1];
        for nodes in [1, 2, 3, 4, 5, 8, 9, 13] {
            let updates: Vec<NodeUpdate<'_>> = (0..nodes)
                .map(|n| NodeUpdate {
                    label: format!("n{n}"),
                    entries: lens
                        .iter()
                        .enumerate()
                        .map(|(k, &len)| {
                            (
                                Key::from(["a", "b", "c", "d", "e", "f"][k]),
                                mixed_value(n, k, len),
                            )
                        })
                        .collect(),
                })
                .collect();
            let weights: Vec<f64> = (0..nodes).map(|n| 0.3 + n as f64 * 1.7).collect();
            let single = average_on(&updates, &weights, Some(1), accumulate).unwrap();
            for threads in [2, 3] {
                assert_eq!(
                    average_on(&updates, &weights, Some(threads), accumulate).unwrap(),
                    single
                );
            }
            for (k, average) in single.iter().enumerate() {
                for i in [0, lens[k] / 2, lens[k] - 1] {
                    let terms: Vec<_> = updates
                        .iter()
                        .zip(&weights)
                        .map(|(u, &w)| (w, element(u.entries[k].1.data(), i)))
                        .collect();
                    let exact = specified(&terms);
                    let expected = match &average.values {
                        ArrayData::F32(_) => f64::from(exact as f32),
                        ArrayData::F16(_) => F16::from_f64(exact).to_f64(),
                        _ => exact,
                    };
                    assert_eq!(
                        element(&average.values, i).to_bits(),
                        expected.to_bits(),
                        "{nodes} nodes, key {k}, index {i}"
                    );
                }
            }
        }
    }

    /// How many work items the plans of `updates` make on `threads` threads.
    fn item_lengths(updates: &[NodeUpdate<'_>], threads: usize) -> Vec<usize> {
        let weights = vec![1.0; updates.len()];
        let plans: Vec<Plan<'_>> = group_by_key(updates)
            .iter()
            .map(|group| plan(group, &weights).unwrap())
            .collect();
        let mut outputs: Vec<ArrayData<'static>> =
            plans.iter().map(|p| p.precision.zeros(p.len)).collect();
        work_items(&plans, &mut outputs, threads)
            .iter()
            .map(|item| match &item.out {
                Out::F64(out) => out.len(),
                Out::F32(out) => out.len(),
                Out::F16(out) => out.len(),
            })
            .collect()
    }

    #[test]
    fn work_is_split_across_keys_and_within_them() {
        let values = vec![0.5; 8192];
        let model = |keys: usize, len: usize| -> Vec<(Key<'_>, Array<'_>)> {
            (0..keys)
                .map(|k| {
                    (
                        Key::from_bytes(format!("k{k}").into_bytes()),
                        Array::floats(&values[..len]),
                    )
                })
                .collect()
        };
        let nodes = |count: usize, keys: usize, len: usize| -> Vec<NodeUpdate<'_>> {
            (0..count)
                .map(|n| NodeUpdate {
                    label: format!("n{n}"),
                    entries: model(keys, len),
                })
                .collect()
        };
        // Many small keys: each a piece of its own, for the threads to share.
        let small = item_lengths(&nodes(100, 200, 5000), 2);
        assert_eq!(small, vec![5000; 200]);
        // One thread: one item per key, however large.
        assert_eq!(item_lengths(&nodes(1000, 1, 8192), 1), [8192]);
        // A key of 8,192 elements carried by 1,000 nodes is split into aligned ranges.
        let split = item_lengths(&nodes(1000, 1, 8192), 2);
        assert!(split.len() >= 8, "{split:?}");
        assert_eq!(split.iter().sum::<usize>(), 8192);
        assert!(split[..split.len() - 1].iter().all(|len| len % ALIGN == 0));
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
            doubles(&weighted_average(&two, &[f64::MAX, 0.0]).unwrap()[0]),
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
