//! Per-key weighted averaging of gradient maps from many nodes.
//!
//! For every key in the union of the updates' keys (in order of first appearance) the result
//! is `sum(w_i * x_i) / sum(w_i)` over the updates that carry a non-empty value for the key,
//! computed as `sum((w_i / total) * x_i)` in float64, in update order, like the reference.
//! The output is produced in one fused pass: for each cache-sized block of an output, every
//! carrier's block is added in while the block stays in cache, so the result's memory is
//! written once. Large inputs are split across threads by output range.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::thread;

use crate::error::AverageError;
use crate::key::Key;

/// One node's value for one key: an N-D array of float64 or float32, row-major.
#[derive(Clone, Debug)]
pub struct Tensor<'a> {
    shape: Vec<usize>,
    data: TensorData<'a>,
}

/// The row-major values of a [`Tensor`], borrowed or owned.
#[derive(Clone, Debug)]
pub enum TensorData<'a> {
    F64(Cow<'a, [f64]>),
    /// Averaged as the doubles of the same values.
    F32(Cow<'a, [f32]>),
}

impl TensorData<'_> {
    fn len(&self) -> usize {
        match self {
            TensorData::F64(d) => d.len(),
            TensorData::F32(d) => d.len(),
        }
    }
}

impl<'a> Tensor<'a> {
    /// A tensor of the given shape (empty for 0-D) over row-major `data`.
    ///
    /// # Panics
    /// If `data` does not hold exactly as many values as `shape`.
    pub fn new(shape: Vec<usize>, data: TensorData<'a>) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "data length must match shape {shape:?}"
        );
        Tensor { shape, data }
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn len(&self) -> usize {
        self.data.len()
    }
}

/// One node's gradient map.
#[derive(Clone, Debug)]
pub struct NodeUpdate<'a> {
    /// Names the node in error messages.
    pub label: String,
    /// `(key, value)` pairs in the map's order.
    pub entries: Vec<(Key<'a>, Tensor<'a>)>,
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
/// update list, the weight count, then each weight finite and non-negative.
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
    match weights.iter().position(|w| !w.is_finite() || *w < 0.0) {
        Some(index) => Err(AverageError::InvalidWeight {
            index,
            weight: weights[index],
        }),
        None => Ok(()),
    }
}

/// Per-key weighted mean of `updates`, weighted by `weights` (one per update).
///
/// Keys come out in order of first appearance. Errors (in this order): those of
/// [`check_weights`]; then, key by key, different shapes for one key and all-zero weights.
pub fn weighted_average(
    updates: &[NodeUpdate<'_>],
    weights: &[f64],
) -> Result<Vec<Average>, AverageError> {
    check_weights(weights, updates.len())?;
    let groups = group_by_key(updates);
    let mut plans = Vec::with_capacity(groups.len());
    for group in &groups {
        plans.push(plan(group, updates, weights)?);
    }
    let mut outputs: Vec<Vec<f64>> = plans.iter().map(|p| vec![0.0; p.len]).collect();
    let work: usize = plans.iter().map(|p| p.len * p.terms.len()).sum();
    let threads = if work >= PARALLEL_MIN_WORK {
        thread::available_parallelism().map_or(1, usize::from)
    } else {
        1
    };
    let items = work_items(&plans, &mut outputs, threads);
    run(items, threads);
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
    carriers: Vec<(usize, &'u Tensor<'a>)>,
}

fn group_by_key<'u, 'a>(updates: &'u [NodeUpdate<'a>]) -> Vec<Group<'u, 'a>> {
    let mut index: HashMap<&Key<'_>, usize> = HashMap::new();
    let mut groups: Vec<Group<'u, 'a>> = Vec::new();
    for (node, update) in updates.iter().enumerate() {
        for (entry, (key, tensor)) in update.entries.iter().enumerate() {
            let slot = *index.entry(key).or_insert_with(|| {
                groups.push(Group {
                    key,
                    node,
                    entry,
                    carriers: Vec::new(),
                });
                groups.len() - 1
            });
            if tensor.len() > 0 {
                groups[slot].carriers.push((node, tensor));
            }
        }
    }
    groups
}

/// One carrier's contribution: `coefficient * values`.
struct Term<'t> {
    coefficient: f64,
    values: &'t TensorData<'t>,
}

/// What to compute for one key.
struct Plan<'t> {
    shape: Vec<usize>,
    len: usize,
    terms: Vec<Term<'t>>,
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
        });
    };
    for &(node, tensor) in &group.carriers[1..] {
        if tensor.shape() != first.shape() {
            return Err(AverageError::ShapeMismatch {
                key: group.key.clone().into_owned(),
                label: updates[node].label.clone(),
                shape: tensor.shape().to_vec(),
                first_label: updates[first_node].label.clone(),
                first_shape: first.shape().to_vec(),
            });
        }
    }
    let total: f64 = group.carriers.iter().map(|&(node, _)| weights[node]).sum();
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
            .map(|&(node, tensor)| Term {
                coefficient: weights[node] / total,
                values: &tensor.data,
            })
            .collect(),
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
    terms: &'o [Term<'t>],
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
                terms: &plan.terms,
            });
        }
    }
    items
}

fn run(items: Vec<WorkItem<'_, '_>>, threads: usize) {
    if threads <= 1 || items.len() <= 1 {
        items.into_iter().for_each(accumulate);
        return;
    }
    let queue = Mutex::new(items.into_iter());
    let next = || queue.lock().expect("no worker panics").next();
    let work = || {
        while let Some(item) = next() {
            accumulate(item);
        }
    };
    thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
}

/// Compute one item: block by block, add every term into the block.
fn accumulate(item: WorkItem<'_, '_>) {
    for (index, block) in item.out.chunks_mut(BLOCK).enumerate() {
        let start = item.offset + index * BLOCK;
        let range = start..start + block.len();
        for (position, term) in item.terms.iter().enumerate() {
            let first = position == 0;
            match term.values {
                TensorData::F64(x) => axpy(block, term.coefficient, &x[range.clone()], first),
                TensorData::F32(x) => axpy(block, term.coefficient, &x[range.clone()], first),
            }
        }
    }
}

/// `out += c * x`, or `out = 0.0 + c * x` for the first term (as NumPy's zeros-plus-product
/// gives it, `-0.0` products included).
#[inline(always)]
fn axpy<T: Copy + Into<f64>>(out: &mut [f64], c: f64, x: &[T], first: bool) {
    if first {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.0 + c * v.into();
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += c * v.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_tensor(shape: &[usize], values: Vec<f64>) -> Tensor<'static> {
        Tensor::new(shape.to_vec(), TensorData::F64(values.into()))
    }

    fn update<'a>(label: &str, entries: Vec<(&'a str, Tensor<'a>)>) -> NodeUpdate<'a> {
        NodeUpdate {
            label: label.to_owned(),
            entries: entries
                .into_iter()
                .map(|(k, t)| (Key::from(k), t))
                .collect(),
        }
    }

    #[test]
    fn weighted_mean_per_key_over_carriers_in_first_appearance_order() {
        let updates = vec![
            update("a", vec![("w", f64_tensor(&[2], vec![1.0, 2.0]))]),
            update(
                "b",
                vec![
                    ("bias", f64_tensor(&[], vec![4.0])),
                    ("w", f64_tensor(&[2], vec![3.0, 6.0])),
                ],
            ),
        ];
        let result = weighted_average(&updates, &[1.0, 3.0]).unwrap();
        assert_eq!(result.len(), 2);
        assert_eq!((result[0].node, result[0].entry), (0, 0));
        assert_eq!(result[0].shape, [2]);
        assert_eq!(
            result[0].values,
            [0.25 * 1.0 + 0.75 * 3.0, 0.25 * 2.0 + 0.75 * 6.0]
        );
        assert_eq!((result[1].node, result[1].entry), (1, 0));
        assert_eq!(result[1].shape, Vec::<usize>::new());
        assert_eq!(result[1].values, [4.0]);
    }

    #[test]
    fn empty_values_do_not_carry_a_key() {
        let updates = vec![
            update(
                "a",
                vec![
                    ("w", f64_tensor(&[0], vec![])),
                    ("e", f64_tensor(&[2, 0], vec![])),
                ],
            ),
            update("b", vec![("w", f64_tensor(&[1], vec![5.0]))]),
        ];
        let result = weighted_average(&updates, &[0.0, 2.0]).unwrap();
        assert_eq!(result[0].values, [5.0]);
        assert_eq!(result[1].shape, [0]);
        assert!(result[1].values.is_empty());
    }

    #[test]
    fn float32_inputs_average_like_their_doubles() {
        let halves = [0.1f32, 0.2, 0.3, 0.4];
        let updates = vec![
            update(
                "a",
                vec![("w", f64_tensor(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]))],
            ),
            update(
                "b",
                vec![(
                    "w",
                    Tensor::new(vec![2, 2], TensorData::F32(halves[..].into())),
                )],
            ),
        ];
        let result = weighted_average(&updates, &[1.0, 1.0]).unwrap();
        let expected: Vec<f64> = [1.0, 2.0, 3.0, 4.0]
            .iter()
            .zip(halves)
            .map(|(&a, b)| 0.0 + 0.5 * a + 0.5 * f64::from(b))
            .collect();
        assert_eq!(result[0].values, expected);
    }

    #[test]
    fn large_inputs_split_across_threads_give_the_same_result() {
        let len = 3 * BLOCK * 17 + 5;
        let nodes = PARALLEL_MIN_WORK / len + 2;
        let updates: Vec<NodeUpdate<'_>> = (0..nodes)
            .map(|n| {
                let values = (0..len)
                    .map(|i| ((i * 31 + n * 7) % 101) as f64 - 50.0)
                    .collect();
                update(&format!("n{n}"), vec![("w", f64_tensor(&[len], values))])
            })
            .collect();
        let weights: Vec<f64> = (0..nodes).map(|n| n as f64 + 0.5).collect();
        let result = weighted_average(&updates, &weights).unwrap();
        let total: f64 = weights.iter().sum();
        for i in [0, 1, BLOCK, len / 2, len - 1] {
            let mut expected = 0.0;
            for (n, w) in weights.iter().enumerate() {
                expected += (w / total) * (((i * 31 + n * 7) % 101) as f64 - 50.0);
            }
            assert_eq!(result[0].values[i], expected, "index {i}");
        }
    }

    #[test]
    fn weight_errors_come_first() {
        assert_eq!(weighted_average(&[], &[]), Err(AverageError::EmptyUpdates));
        let one = vec![update("a", vec![("w", f64_tensor(&[1], vec![1.0]))])];
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
    fn shape_mismatch_names_the_key_and_both_nodes() {
        let updates = vec![
            update("node-a", vec![("w", f64_tensor(&[2], vec![1.0, 2.0]))]),
            update("node-b", vec![("w", f64_tensor(&[1, 2], vec![1.0, 2.0]))]),
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
            update("a", vec![("w", f64_tensor(&[1], vec![1.0]))]),
            update("b", vec![("v", f64_tensor(&[1], vec![1.0]))]),
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
