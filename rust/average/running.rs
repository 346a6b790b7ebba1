//! The weighted mean folded update by update: a running float64 sum per key.
//!
//! [`WeightedSum::fold`] adds a batch of updates to one float64 accumulator per key (the
//! fused kernel's groups over the batch's carriers, in update order), and
//! [`WeightedSum::finish`] divides by each key's total weight and rounds once to the
//! carriers' widest float type. Every element goes through exactly the operations of
//! [`weighted_average`](super::weighted_average) over the concatenation of everything folded,
//! in fold order, whatever the split into batches: `acc = acc + w_i * x_i` from `0.0` for each
//! carrier in order, then `acc / W`. Memory: the accumulators (float64, one model), never the
//! updates once folded.

use std::collections::HashMap;
use std::mem;

use super::dequant::{add_encoded, Codes};
use super::kernel::Start;
use super::{
    check_more_weights, check_shapes, group_by_key, kernel, sum_from, terms_plan, work_items,
    NodeUpdate, Out, Plan, Precision, WorkItem,
};
use crate::array::{ArrayData, F16};
use crate::error::{shape_repr, AverageError};
use crate::key::Key;
use crate::{parallel, simd};

/// A running per-key weighted sum of gradient maps (see the module).
#[derive(Debug, Default)]
pub struct WeightedSum {
    slots: Vec<Slot>,
    index: HashMap<Key<'static>, usize>,
    /// Updates folded so far.
    folded: usize,
    /// Their weights, summed in fold order.
    weight_total: f64,
}

/// One key's running sum.
#[derive(Debug)]
struct Slot {
    key: Key<'static>,
    /// The shape and label of the key's first carrier; None while no update carried the key
    /// non-empty.
    first: Option<(Vec<usize>, String)>,
    /// `sum(w_i * x_i)` so far, row-major (empty while `first` is None).
    acc: Vec<f64>,
    /// The carriers' weights summed in fold order.
    total: f64,
    /// The carriers' widest float type.
    precision: Precision,
}

impl Slot {
    /// Take `shape` and `label` as the key's first carrier's, with a zero sum, unless a
    /// carrier came before.
    fn start(&mut self, shape: &[usize], label: &str) {
        if self.first.is_none() {
            self.first = Some((shape.to_vec(), label.to_owned()));
            self.acc = vec![0.0; shape.iter().product()];
        }
    }
}

/// One key's mean, from [`WeightedSum::finish`].
#[derive(Clone, Debug, PartialEq)]
pub struct KeyMean {
    /// Shape of the carriers' values; `[0]` when no update carried the key non-empty.
    pub shape: Vec<usize>,
    /// The mean, row-major, in the carriers' widest float type.
    pub values: ArrayData<'static>,
}

/// One node's encoded gradient map, for [`WeightedSum::fold_encoded`].
#[derive(Clone, Debug)]
pub struct EncodedUpdate<'a> {
    /// Names the node in error messages.
    pub label: String,
    /// The map's entries, in its order.
    pub entries: Vec<EncodedEntry<'a>>,
}

/// One tensor of an [`EncodedUpdate`].
#[derive(Clone, Debug)]
pub struct EncodedEntry<'a> {
    pub key: Key<'a>,
    /// The decoded tensor's shape.
    pub shape: Vec<usize>,
    /// The model's float type, which the codes decode to.
    pub precision: Precision,
    pub codes: Codes<'a>,
}

/// One key of a batch of encoded updates: the (update, entry) where it first appears, and
/// its carriers (update index, entry) in update order.
type EncodedGroup<'u, 'a> = ((usize, usize), Vec<(usize, &'u EncodedEntry<'a>)>);

/// Why encoded updates cannot be folded.
#[derive(Clone, Debug, PartialEq)]
pub enum FoldEncodedError {
    /// As [`WeightedSum::fold`] refuses plain updates.
    Average(AverageError),
    /// An update's codes or scales do not hold its tensor's values.
    Codes {
        key: Key<'static>,
        label: String,
        shape: Vec<usize>,
        problem: String,
    },
}

impl FoldEncodedError {
    /// The message, with keys written by `key_repr` (see [`AverageError::message_with`]).
    pub fn message_with(&self, key_repr: &dyn Fn(&Key<'_>) -> String) -> String {
        match self {
            FoldEncodedError::Average(error) => error.message_with(key_repr),
            FoldEncodedError::Codes {
                key,
                label,
                shape,
                problem,
            } => format!(
                "gradient {} of shape {} from {label}: {problem}",
                key_repr(key),
                shape_repr(shape)
            ),
        }
    }
}

/// Accumulator elements divided per piece of work in [`WeightedSum::finish`].
const DIVIDE_PIECE: usize = 1 << 16;

impl WeightedSum {
    /// An empty sum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Updates folded so far.
    pub fn folded(&self) -> usize {
        self.folded
    }

    /// Check the weights of a batch of `updates` updates as [`fold`](Self::fold) does, before
    /// any value is looked at: the count, each weight finite and non-negative (numbered from
    /// the updates already folded), the total of every weight folded finite.
    pub fn check_weights(&self, weights: &[f64], updates: usize) -> Result<(), AverageError> {
        check_more_weights(weights, updates, self.folded, self.weight_total).map(|_| ())
    }

    /// Add `updates`, weighted by `weights`, after those already folded.
    ///
    /// Returns `(update, entry)` for each key that this batch mentions for the first time, in
    /// the order [`finish`](Self::finish) gives the keys. On an error nothing is added.
    ///
    /// # Errors
    /// Those of [`check_weights`](Self::check_weights), then a value whose shape differs from
    /// the key's first carrier (in this batch or an earlier one).
    pub fn fold(
        &mut self,
        updates: &[NodeUpdate<'_>],
        weights: &[f64],
    ) -> Result<Vec<(usize, usize)>, AverageError> {
        let weight_total =
            check_more_weights(weights, updates.len(), self.folded, self.weight_total)?;
        let groups = group_by_key(updates);
        let mut plans: Vec<(usize, Plan<'_>)> = Vec::with_capacity(groups.len());
        for (position, group) in groups.iter().enumerate() {
            let Some(&(first_node, first)) = group.carriers.first() else {
                continue;
            };
            let (shape, label) =
                self.expected(group.key, first.shape(), &updates[first_node].label);
            check_shapes(group, updates, label, shape)?;
            plans.push((position, terms_plan(group, weights, shape.to_vec(), 0.0)));
        }

        // Nothing below fails: record the keys, then add the terms.
        let mut new_keys = Vec::new();
        let slots: Vec<usize> = groups
            .iter()
            .map(|group| self.slot_of(group.key, (group.node, group.entry), &mut new_keys))
            .collect();
        let mut accumulators = Vec::with_capacity(plans.len());
        for (position, plan) in &plans {
            let group = &groups[*position];
            let slot = &mut self.slots[slots[*position]];
            slot.start(&plan.shape, &updates[group.carriers[0].0].label);
            slot.total = sum_from(slot.total, plan.terms.iter().map(|term| term.weight));
            slot.precision = slot.precision.max(plan.precision);
            accumulators.push(ArrayData::F64(mem::take(&mut slot.acc).into()));
        }
        let (positions, plans): (Vec<usize>, Vec<Plan<'_>>) = plans.into_iter().unzip();
        let threads = parallel::threads_for(plans.iter().map(Plan::work).sum());
        let items = work_items(&plans, &mut accumulators, threads);
        parallel::for_each(items, threads, add);
        for (position, acc) in positions.into_iter().zip(accumulators) {
            let ArrayData::F64(acc) = acc else {
                unreachable!("accumulators are float64")
            };
            self.slots[slots[position]].acc = acc.into_owned();
        }
        self.folded += updates.len();
        self.weight_total = weight_total;
        Ok(new_keys)
    }

    /// Add encoded `updates`, weighted by `weights`, after those already folded: bit for bit
    /// what [`fold`](Self::fold) of the decoded updates (each decoded in its model's float
    /// type, as [`super::dequantise_average`] decodes) adds, read from the codes in one pass
    /// per key without a decoded copy. Plain and encoded folds may alternate in any order.
    ///
    /// Returns what [`fold`](Self::fold) returns; on an error nothing is added.
    ///
    /// # Errors
    /// Those of [`fold`](Self::fold), then codes or scales that do not hold their tensor.
    pub fn fold_encoded(
        &mut self,
        updates: &[EncodedUpdate<'_>],
        weights: &[f64],
    ) -> Result<Vec<(usize, usize)>, FoldEncodedError> {
        let weight_total =
            check_more_weights(weights, updates.len(), self.folded, self.weight_total)
                .map_err(FoldEncodedError::Average)?;
        // Per key in order of first appearance: its first (update, entry) and its carriers.
        let mut groups: Vec<EncodedGroup<'_, '_>> = Vec::new();
        let mut positions: HashMap<&Key<'_>, usize> = HashMap::new();
        for (node, update) in updates.iter().enumerate() {
            for (entry_index, entry) in update.entries.iter().enumerate() {
                let position = *positions.entry(&entry.key).or_insert_with(|| {
                    groups.push(((node, entry_index), Vec::new()));
                    groups.len() - 1
                });
                if entry.shape.iter().product::<usize>() > 0 {
                    groups[position].1.push((node, entry));
                }
            }
        }
        for (_, carriers) in &groups {
            let Some(&(first_node, first)) = carriers.first() else {
                continue;
            };
            let (shape, label) =
                self.expected(&first.key, &first.shape, &updates[first_node].label);
            for &(node, entry) in carriers {
                if entry.shape != shape {
                    return Err(FoldEncodedError::Average(AverageError::ShapeMismatch {
                        key: entry.key.clone().into_owned(),
                        label: updates[node].label.clone(),
                        shape: entry.shape.clone(),
                        first_label: label.to_owned(),
                        first_shape: shape.to_vec(),
                    }));
                }
                if let Some(problem) = entry.codes.size_problem(shape.iter().product()) {
                    return Err(FoldEncodedError::Codes {
                        key: entry.key.clone().into_owned(),
                        label: updates[node].label.clone(),
                        shape: entry.shape.clone(),
                        problem,
                    });
                }
            }
        }

        // Nothing below fails: record the keys, then add the terms key by key.
        let mut new_keys = Vec::new();
        for ((node, entry_index), carriers) in &groups {
            let key = &updates[*node].entries[*entry_index].key;
            let slot = self.slot_of(key, (*node, *entry_index), &mut new_keys);
            let Some(&(first_node, first)) = carriers.first() else {
                continue;
            };
            let slot = &mut self.slots[slot];
            slot.start(&first.shape, &updates[first_node].label);
            let term_weights: Vec<f64> = carriers.iter().map(|&(node, _)| weights[node]).collect();
            let codes: Vec<Codes<'_>> = carriers.iter().map(|(_, entry)| entry.codes).collect();
            let precisions: Vec<Precision> =
                carriers.iter().map(|(_, entry)| entry.precision).collect();
            slot.total = sum_from(slot.total, term_weights.iter().copied());
            slot.precision = precisions
                .iter()
                .copied()
                .fold(slot.precision, Precision::max);
            add_encoded(&mut slot.acc, &codes, &precisions, &term_weights)
                .expect("the codes' sizes are checked above");
        }
        self.folded += updates.len();
        self.weight_total = weight_total;
        Ok(new_keys)
    }

    /// The shape and label that `key`'s carriers must match: those of its first carrier
    /// folded so far, else `shape` and `label` (the batch's first).
    fn expected<'s>(
        &'s self,
        key: &Key<'_>,
        shape: &'s [usize],
        label: &'s str,
    ) -> (&'s [usize], &'s str) {
        match self
            .index
            .get(key)
            .and_then(|&slot| self.slots[slot].first.as_ref())
        {
            Some((shape, label)) => (shape.as_slice(), label.as_str()),
            None => (shape, label),
        }
    }

    /// The slot of `key`, made (and `at`, its first (update, entry), recorded in `new_keys`)
    /// when the key is new.
    fn slot_of(
        &mut self,
        key: &Key<'_>,
        at: (usize, usize),
        new_keys: &mut Vec<(usize, usize)>,
    ) -> usize {
        *self
            .index
            .entry(key.clone().into_owned())
            .or_insert_with(|| {
                new_keys.push(at);
                self.slots.push(Slot {
                    key: key.clone().into_owned(),
                    first: None,
                    acc: Vec::new(),
                    total: 0.0,
                    precision: Precision::Half,
                });
                self.slots.len() - 1
            })
    }

    /// Check that [`finish`](Self::finish) can succeed: at least one update folded, and no
    /// key whose carriers all have weight zero (the first such key is named).
    pub fn check_finish(&self) -> Result<(), AverageError> {
        if self.folded == 0 {
            return Err(AverageError::EmptyUpdates);
        }
        match self
            .slots
            .iter()
            .find(|slot| slot.first.is_some() && slot.total == 0.0)
        {
            Some(slot) => Err(AverageError::ZeroWeights {
                key: slot.key.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The per-key means, keys in order of first appearance: each accumulator divided by its
    /// key's total weight, rounded once to the carriers' widest float type (a key no update
    /// carried non-empty gives an empty float64 vector).
    ///
    /// # Errors
    /// Those of [`check_finish`](Self::check_finish).
    pub fn finish(self) -> Result<Vec<KeyMean>, AverageError> {
        self.check_finish()?;
        Ok(self.slots.into_iter().map(Slot::mean).collect())
    }
}

impl Slot {
    /// The key's mean (its total checked non-zero when it has carriers).
    fn mean(self) -> KeyMean {
        let Some((shape, _)) = self.first else {
            return KeyMean {
                shape: vec![0],
                values: ArrayData::F64(Vec::new().into()),
            };
        };
        let (acc, total) = (self.acc, self.total);
        let values = match self.precision {
            Precision::Double => {
                let mut acc = acc;
                divide(&mut acc, total);
                ArrayData::F64(acc.into())
            }
            Precision::Single => ArrayData::F32(narrowed(&acc, total, |x| x as f32).into()),
            Precision::Half => ArrayData::F16(narrowed(&acc, total, F16::from_f64).into()),
        };
        KeyMean { shape, values }
    }
}

/// `acc / total` of each element, rounded by `narrow`, into a new vector.
fn narrowed<N: Copy + Default + Send>(
    acc: &[f64],
    total: f64,
    narrow: impl Fn(f64) -> N + Sync,
) -> Vec<N> {
    let mut out = vec![N::default(); acc.len()];
    let pieces: Vec<(&mut [N], &[f64])> = out
        .chunks_mut(DIVIDE_PIECE)
        .zip(acc.chunks(DIVIDE_PIECE))
        .collect();
    parallel::for_each(pieces, parallel::threads_for(acc.len()), |(out, acc)| {
        for (o, &x) in out.iter_mut().zip(acc) {
            *o = narrow(x / total);
        }
    });
    out
}

/// `acc[i] = acc[i] / total` in place: the float64 result.
fn divide(acc: &mut [f64], total: f64) {
    let threads = parallel::threads_for(acc.len());
    let pieces: Vec<&mut [f64]> = acc.chunks_mut(DIVIDE_PIECE).collect();
    parallel::for_each(pieces, threads, |piece| {
        for x in piece {
            *x /= total;
        }
    });
}

/// Add one item's terms into its range of an accumulator, with the widest vector
/// instructions the CPU has.
fn add(item: WorkItem<'_, '_>) {
    simd::dispatch(
        #[inline(always)]
        || {
            let Out::F64(out) = item.out else {
                unreachable!("accumulators are float64")
            };
            // Dividing by 1.0 is exact (every double, -0.0 and NaN included, is itself), so
            // the kernel of the whole average adds the terms and leaves the sum as it is.
            kernel::accumulate(
                out,
                item.offset,
                &item.plan.terms,
                &item.plan.groups,
                1.0,
                Start::Sums,
            );
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array::Array;
    use crate::average::{weighted_average, Average};

    /// `nodes` updates of keys `a` (float64), `b` (float32, carried by every other node),
    /// `c` (float16) and `d` (mixed float32 and float64), of a few blocks' length.
    fn updates(nodes: usize, len: usize) -> Vec<NodeUpdate<'static>> {
        let x = |n: usize, k: usize, i: usize| {
            let scale = [1e-8, 1.0, 3e5, 0.1][(i * 7 + n + k) % 4];
            ((((i * 31 + n * 17 + k * 5) % 97) as f64) - 48.0) / 7.0 * scale
        };
        (0..nodes)
            .map(|n| {
                let mut entries = vec![(
                    Key::from("a"),
                    Array::new(
                        vec![len],
                        ArrayData::F64((0..len).map(|i| x(n, 0, i)).collect::<Vec<_>>().into()),
                    ),
                )];
                if n % 2 == 1 {
                    let values: Vec<f32> = (0..len).map(|i| x(n, 1, i) as f32).collect();
                    entries.push((
                        Key::from("b"),
                        Array::new(vec![len], ArrayData::F32(values.into())),
                    ));
                }
                let halves: Vec<F16> = (0..3).map(|i| F16::from_f64(x(n, 2, i) / 1e3)).collect();
                entries.push((
                    Key::from("c"),
                    Array::new(vec![3], ArrayData::F16(halves.into())),
                ));
                let mixed = if n % 3 == 0 {
                    ArrayData::F64(vec![x(n, 3, 0), x(n, 3, 1)].into())
                } else {
                    ArrayData::F32(vec![x(n, 3, 0) as f32, x(n, 3, 1) as f32].into())
                };
                entries.push((Key::from("d"), Array::new(vec![2], mixed)));
                NodeUpdate {
                    label: format!("n{n}"),
                    entries,
                }
            })
            .collect()
    }

    fn folded(updates: &[NodeUpdate<'_>], weights: &[f64], cuts: &[usize]) -> Vec<KeyMean> {
        let mut sum = WeightedSum::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&updates.len()]) {
            sum.fold(&updates[start..end], &weights[start..end])
                .unwrap();
            start = end;
        }
        sum.finish().unwrap()
    }

    fn as_means(averages: Vec<Average>) -> Vec<KeyMean> {
        averages
            .into_iter()
            .map(|average| KeyMean {
                shape: average.shape,
                values: average.values,
            })
            .collect()
    }

    #[test]
    fn any_split_into_folds_gives_the_weighted_average_bit_for_bit() {
        let len = 2 * kernel::NARROW_BLOCK + 13;
        let nodes = 11;
        let updates = updates(nodes, len);
        let weights: Vec<f64> = (0..nodes).map(|n| 0.3 + n as f64 * 1.7).collect();
        let whole = as_means(weighted_average(&updates, &weights).unwrap());
        for cuts in [
            vec![],
            vec![1],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            vec![3, 9],
            vec![0, 0, 5],
        ] {
            let means = folded(&updates, &weights, &cuts);
            assert_eq!(means, whole, "cuts {cuts:?}");
        }
        // Keys in order of first appearance: b first comes from node 1.
        assert!(matches!(whole[1].values, ArrayData::F16(_)));
        assert!(matches!(whole[2].values, ArrayData::F64(_)));
        assert!(matches!(whole[3].values, ArrayData::F32(_)));
    }

    #[test]
    fn encoded_folds_match_folding_the_decoded_updates_in_any_interleaving() {
        use crate::average::dequant::tests::sample_inputs;
        use crate::average::{dequantise_average, Levels};
        let len = 3 * 1024 + 37;
        let nodes = 10;
        let (bytes, scales, weights) = sample_inputs(nodes, len);
        // Node n's codec (n % 5) and its model's float type (n % 3).
        let codes_of = |n: usize| {
            let blockwise = |levels: Levels| Codes::Blockwise {
                levels,
                codes: if levels == Levels::Int8 {
                    &bytes[n][..len]
                } else {
                    &bytes[n][..len.div_ceil(2)]
                },
                scales: &scales[n][..len.div_ceil(16)],
                block: 16,
            };
            match n % 5 {
                0 => blockwise(Levels::Int8),
                1 => blockwise(Levels::Int4),
                2 => blockwise(Levels::E3m0),
                3 => Codes::Fp16(&bytes[n][..]),
                _ => Codes::Bf16(&bytes[n][..]),
            }
        };
        let precision_of =
            |n: usize| [Precision::Double, Precision::Single, Precision::Half][n % 3];
        let encoded: Vec<EncodedUpdate<'_>> = (0..nodes)
            .map(|n| EncodedUpdate {
                label: format!("n{n}"),
                entries: vec![EncodedEntry {
                    key: Key::from("w"),
                    shape: vec![len],
                    precision: precision_of(n),
                    codes: codes_of(n),
                }],
            })
            .collect();
        // Decoding a term alone: (0 + 1 * x) / 1 is x.
        let decoded: Vec<NodeUpdate<'_>> = (0..nodes)
            .map(|n| NodeUpdate {
                label: format!("n{n}"),
                entries: vec![(
                    Key::from("w"),
                    Array::new(
                        vec![len],
                        dequantise_average(&[codes_of(n)], &[1.0], len, precision_of(n)).unwrap(),
                    ),
                )],
            })
            .collect();
        let whole = as_means(weighted_average(&decoded, &weights).unwrap());
        // Which nodes go in encoded, and the cuts between folds.
        for (plain_nodes, cuts) in [
            (vec![], vec![]),
            (vec![], vec![3, 4, 9]),
            (vec![0, 5, 6], vec![1, 5, 6, 8]),
            (vec![1, 2, 3], vec![2, 4]),
        ] {
            let mut sum = WeightedSum::new();
            let mut start = 0;
            for &end in cuts.iter().chain([&nodes]) {
                let mut at = start;
                while at < end {
                    let plain = plain_nodes.contains(&at);
                    let mut stop = at + 1;
                    while stop < end && plain_nodes.contains(&stop) == plain {
                        stop += 1;
                    }
                    if plain {
                        sum.fold(&decoded[at..stop], &weights[at..stop]).unwrap();
                    } else {
                        sum.fold_encoded(&encoded[at..stop], &weights[at..stop])
                            .unwrap();
                    }
                    at = stop;
                }
                start = end;
            }
            let means = sum.finish().unwrap();
            assert_eq!(means, whole, "plain {plain_nodes:?} cuts {cuts:?}");
        }
    }

    #[test]
    fn encoded_folds_refuse_wrong_shapes_and_sizes_and_add_nothing() {
        let codes = [0u8; 16];
        let scales = [1.0f32; 2];
        let one = |label: &str, shape: Vec<usize>, bytes: usize| EncodedUpdate {
            label: label.to_owned(),
            entries: vec![EncodedEntry {
                key: Key::from("w"),
                shape,
                precision: Precision::Single,
                codes: Codes::Blockwise {
                    levels: crate::average::Levels::Int8,
                    codes: &codes[..bytes],
                    scales: &scales,
                    block: 8,
                },
            }],
        };
        let mut sum = WeightedSum::new();
        sum.fold_encoded(&[one("a", vec![16], 16)], &[1.0]).unwrap();
        assert!(matches!(
            sum.fold_encoded(&[one("b", vec![4, 4], 16)], &[1.0]),
            Err(FoldEncodedError::Average(
                AverageError::ShapeMismatch { .. }
            ))
        ));
        let error = sum
            .fold_encoded(&[one("c", vec![16], 15)], &[1.0])
            .unwrap_err();
        assert_eq!(
            error.message_with(&|key| key.to_string()),
            "gradient 'w' of shape (16,) from c: 15 code bytes for 16 values, expected 16"
        );
        assert_eq!(sum.folded(), 1);
    }

    #[test]
    fn keys_come_out_in_order_of_first_appearance_across_folds() {
        let one = |key: &'static str, shape: Vec<usize>, values: Vec<f64>| NodeUpdate {
            label: key.to_owned(),
            entries: vec![(
                Key::from(key),
                Array::new(shape, ArrayData::F64(values.into())),
            )],
        };
        let mut sum = WeightedSum::new();
        let first = [one("x", vec![0], vec![]), one("y", vec![1], vec![2.0])];
        assert_eq!(sum.fold(&first, &[1.0, 1.0]).unwrap(), [(0, 0), (1, 0)]);
        let second = [one("z", vec![1], vec![4.0]), one("x", vec![1], vec![6.0])];
        assert_eq!(sum.fold(&second, &[1.0, 3.0]).unwrap(), [(0, 0)]);
        let means = sum.finish().unwrap();
        let values: Vec<_> = means.iter().map(|mean| mean.values.clone()).collect();
        assert_eq!(
            values,
            [
                ArrayData::F64(vec![6.0].into()),
                ArrayData::F64(vec![2.0].into()),
                ArrayData::F64(vec![4.0].into()),
            ]
        );
    }

    #[test]
    fn errors_name_the_key_and_nodes_across_folds_and_leave_the_sum_unchanged() {
        let one = |label: &str, key: &'static str, shape: Vec<usize>| NodeUpdate {
            label: label.to_owned(),
            entries: vec![(
                Key::from(key),
                Array::new(
                    shape.clone(),
                    ArrayData::F64(vec![1.0; shape.iter().product()].into()),
                ),
            )],
        };
        let mut sum = WeightedSum::new();
        assert_eq!(sum.check_finish(), Err(AverageError::EmptyUpdates));
        sum.fold(&[one("node-a", "w", vec![2])], &[0.0]).unwrap();
        let error = sum
            .fold(&[one("node-b", "w", vec![1, 2])], &[1.0])
            .unwrap_err();
        assert_eq!(
            error,
            AverageError::ShapeMismatch {
                key: Key::from("w").into_owned(),
                label: "node-b".to_owned(),
                shape: vec![1, 2],
                first_label: "node-a".to_owned(),
                first_shape: vec![2],
            }
        );
        assert_eq!(
            sum.fold(&[one("node-c", "w", vec![2])], &[-1.0]),
            Err(AverageError::InvalidWeight {
                index: 1,
                weight: -1.0
            })
        );
        assert_eq!(
            sum.fold(&[one("node-c", "w", vec![2])], &[]),
            Err(AverageError::WeightCount {
                weights: 0,
                updates: 1
            })
        );
        assert_eq!(sum.folded(), 1);
        assert_eq!(
            sum.check_finish(),
            Err(AverageError::ZeroWeights {
                key: Key::from("w").into_owned()
            })
        );
        sum.fold(&[one("node-d", "v", vec![1])], &[f64::MAX])
            .unwrap();
        assert_eq!(
            sum.fold(&[one("node-e", "v", vec![1])], &[f64::MAX]),
            Err(AverageError::WeightsOverflow)
        );
        sum.fold(&[one("node-f", "w", vec![2])], &[2.0]).unwrap();
        let means = sum.finish().unwrap();
        assert_eq!(means[0].values, ArrayData::F64(vec![1.0, 1.0].into()));
    }
}
