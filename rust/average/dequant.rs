//! The weighted average of one key's compressed updates, dequantised inside the fused pass.
//!
//! Each term is one update's encoding of the key (`aumai_fedtrain.compression`): blockwise
//! codes (int8, int4 or e3m0, with a float32 scale per block of `block` values) or 16-bit
//! floats (fp16, bf16). The result is defined as decoding every term the way NumPy's
//! `compression.decode` does and averaging the decoded arrays with [`super::weighted_average`],
//! bit for bit:
//!
//! - a blockwise value decodes to `level * scale` computed exactly in float64 (the level is the
//!   code, or an e3m0 code's `±2^-k`), rounded once to the model's float type; an fp16 value is
//!   its half, a bf16 value the float32 of its bits, rounded to the model's float type;
//! - then, per element, `acc = 0.0`, `acc = acc + (w_i * x_i)` for each term in update order,
//!   and `acc / W` rounded once to the model's float type, `W` the weights summed in order.
//!
//! A float32 model's `level * scale` is computed as a float32 product: IEEE multiplication
//! rounds the exact product once, which is what rounding the exact float64 product does. The
//! kernel reads the compressed bytes once: block by cache-sized block of the output, up to
//! [`DEQUANT_FUSE`] terms at a time are decoded [`LANES`] values at a time and added in a
//! register, so no decoded copy of any update is made.

use crate::array::{ArrayData, F16};
use crate::error::AverageError;
use crate::{parallel, simd};

use super::{check_weights, sum_from, Precision};

/// Values decoded and added together (a chunk may span several blocks of 8, see
/// [`Blockwise::scales_of`]).
const LANES: usize = 32;

/// The smallest block of a blockwise codec: the values of a chunk share a scale in runs of
/// at least this many.
const MIN_BLOCK: usize = 8;

/// Output elements per block (128 KiB of float64), kept in the core's second-level cache while
/// every term is added to it (4,096 measured the same at N = 100 x P = 10^6).
const DEQUANT_BLOCK: usize = 16 * 1024;

/// Terms decoded and added to a block in one pass.
const DEQUANT_FUSE: usize = 8;

/// Output elements handed to a thread come in multiples of this (whole cache lines of the
/// output, whole bytes of 4-bit codes, whole chunks of [`LANES`]).
const ALIGN: usize = 64;

/// How a blockwise code becomes its level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// One signed byte per value, the level is the code (`int8`).
    Int8,
    /// Two 4-bit codes per byte (`nibble - 8`, the first in the low nibble); the level is the
    /// code (`int4`).
    Int4,
    /// Two 4-bit codes per byte as for [`Levels::Int4`]; a code `c` is `0` for `c == 0`, else
    /// `sign(c) * 2^(|c| - 7)` (`e3m0`).
    E3m0,
}

/// One update's encoding of the key.
#[derive(Clone, Copy, Debug)]
pub enum Codes<'a> {
    /// Blockwise codes and their float32 scales (one per `block` values, the last block
    /// possibly short).
    Blockwise {
        levels: Levels,
        codes: &'a [u8],
        scales: &'a [f32],
        block: usize,
    },
    /// IEEE half-precision values, little-endian (`fp16`).
    Fp16(&'a [u8]),
    /// bfloat16 values, the top 16 bits of a float32, little-endian (`bf16`).
    Bf16(&'a [u8]),
}

impl Codes<'_> {
    /// Why these codes cannot hold `len` values, if they cannot.
    pub(super) fn size_problem(&self, len: usize) -> Option<String> {
        match *self {
            Codes::Blockwise {
                levels,
                codes,
                scales,
                block,
            } => {
                let bytes = if levels == Levels::Int8 {
                    len
                } else {
                    len.div_ceil(2)
                };
                if !block.is_power_of_two() || block < 8 {
                    Some(format!("block size {block} is not a power of two >= 8"))
                } else if codes.len() != bytes {
                    Some(format!(
                        "{} code bytes for {len} values, expected {bytes}",
                        codes.len()
                    ))
                } else if scales.len() != len.div_ceil(block) {
                    let blocks = len.div_ceil(block);
                    Some(format!("{} scales for {blocks} blocks", scales.len()))
                } else {
                    None
                }
            }
            Codes::Fp16(codes) | Codes::Bf16(codes) => (codes.len() != 2 * len)
                .then(|| format!("{} code bytes for {len} 16-bit values", codes.len())),
        }
    }

    /// Whether `self` and `other` are of one codec (and block size).
    fn same_codec(&self, other: &Codes<'_>) -> bool {
        match (self, other) {
            (
                Codes::Blockwise { levels, block, .. },
                Codes::Blockwise {
                    levels: other_levels,
                    block: other_block,
                    ..
                },
            ) => levels == other_levels && block == other_block,
            (Codes::Fp16(_), Codes::Fp16(_)) | (Codes::Bf16(_), Codes::Bf16(_)) => true,
            _ => false,
        }
    }
}

/// Why compressed updates cannot be averaged.
#[derive(Clone, Debug, PartialEq)]
pub enum DequantError {
    /// A weight error, as the plain average reports it.
    Weights(AverageError),
    /// The terms' codes differ in codec or block size.
    MixedCodecs { index: usize },
    /// A term's codes or scales do not hold the key's values.
    Size { index: usize, problem: String },
    /// Every weight is zero.
    ZeroWeights,
}

impl std::fmt::Display for DequantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DequantError::Weights(error) => write!(f, "{}", error.message_with(&|k| k.to_string())),
            DequantError::MixedCodecs { index } => write!(
                f,
                "update #{index} is encoded with another codec or block size than update #0"
            ),
            DequantError::Size { index, problem } => write!(f, "update #{index}: {problem}"),
            DequantError::ZeroWeights => write!(f, "all weights are zero"),
        }
    }
}

/// The weighted average of `len` values encoded by each of `terms` (see the module), in the
/// model's float type `precision`.
///
/// Errors: the weights' (as [`super::weighted_average`] checks them), terms of different
/// codecs or block sizes, codes or scales of the wrong length, all-zero weights.
pub fn dequantise_average(
    terms: &[Codes<'_>],
    weights: &[f64],
    len: usize,
    precision: Precision,
) -> Result<ArrayData<'static>, DequantError> {
    check_weights(weights, terms.len()).map_err(DequantError::Weights)?;
    for (index, codes) in terms.iter().enumerate() {
        if !codes.same_codec(&terms[0]) {
            return Err(DequantError::MixedCodecs { index });
        }
        if let Some(problem) = codes.size_problem(len) {
            return Err(DequantError::Size { index, problem });
        }
    }
    let total = sum_from(0.0, weights.iter().copied());
    if total == 0.0 {
        return Err(DequantError::ZeroWeights);
    }
    let mut result = precision.zeros(len);
    let threads = parallel::threads_for(len * terms.len());
    match &mut result {
        ArrayData::F64(out) => run(out.to_mut(), terms, weights, total, threads, |x| x),
        ArrayData::F32(out) => run(out.to_mut(), terms, weights, total, threads, |x| x as f32),
        ArrayData::F16(out) => run(out.to_mut(), terms, weights, total, threads, F16::from_f64),
        ArrayData::I64(_) | ArrayData::U64(_) => unreachable!("results are floats"),
    }
    Ok(result)
}

/// Add each term's decoded values, weighted, to `acc` in term order: per element,
/// `acc[i] = acc[i] + (w_0 * x_0[i])`, then `+ (w_1 * x_1[i])`, ..., term `j` decoded (as
/// [`dequantise_average`] decodes it) for a model of `precisions[j]`: exactly what adding the
/// decoded arrays does, so a running sum can take encoded and plain updates in any order.
/// Consecutive terms of one codec and precision are added [`DEQUANT_FUSE`] at a time.
///
/// Errors: codes or scales that do not hold `acc.len()` values (the first such term).
pub fn add_encoded(
    acc: &mut [f64],
    terms: &[Codes<'_>],
    precisions: &[Precision],
    weights: &[f64],
) -> Result<(), DequantError> {
    assert!(terms.len() == precisions.len() && terms.len() == weights.len());
    let len = acc.len();
    for (index, codes) in terms.iter().enumerate() {
        if let Some(problem) = codes.size_problem(len) {
            return Err(DequantError::Size { index, problem });
        }
    }
    // Runs of terms decoded alike, at most DEQUANT_FUSE long.
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for index in 0..terms.len() {
        match runs.last_mut() {
            Some(run)
                if run.len() < DEQUANT_FUSE
                    && terms[index].same_codec(&terms[run.start])
                    && precisions[index] == precisions[run.start] =>
            {
                run.end = index + 1;
            }
            _ => runs.push(index..index + 1),
        }
    }
    let threads = parallel::threads_for(len * terms.len());
    let items = pieces_of(acc, terms.len(), threads);
    parallel::for_each(items, threads, |(offset, piece)| {
        for (index, block) in piece.chunks_mut(DEQUANT_BLOCK).enumerate() {
            for run in &runs {
                let group = Group {
                    terms: &terms[run.clone()],
                    weights: &weights[run.clone()],
                    first: offset + index * DEQUANT_BLOCK,
                    divide: None,
                };
                add_group::<false>(block, &group, precisions[run.start]);
            }
        }
    });
    Ok(())
}

/// Fill `out` on `threads` threads, each element range rounded from a float64 block by
/// `narrow` (the identity for a float64 result).
fn run<N: Copy + Send + Sync + FloatOut>(
    out: &mut [N],
    terms: &[Codes<'_>],
    weights: &[f64],
    total: f64,
    threads: usize,
    narrow: impl Fn(f64) -> N + Sync + Copy,
) {
    let items = pieces_of(out, terms.len(), threads);
    parallel::for_each_with(
        items,
        threads,
        || vec![0.0; DEQUANT_BLOCK],
        |scratch, (offset, piece)| {
            for (index, block) in piece.chunks_mut(DEQUANT_BLOCK).enumerate() {
                let first = offset + index * DEQUANT_BLOCK;
                let acc = &mut scratch[..block.len()];
                add_terms(acc, first, terms, weights, total, N::PRECISION);
                for (o, &x) in block.iter_mut().zip(acc.iter()) {
                    *o = narrow(x);
                }
            }
        },
    );
}

/// `out` cut into the pieces that `threads` threads take when `terms` terms are added to
/// each element, with the index of each piece's first element.
fn pieces_of<N>(out: &mut [N], terms: usize, threads: usize) -> Vec<(usize, &mut [N])> {
    let len = out.len();
    let mut items = Vec::new();
    let mut rest = out;
    for range in parallel::pieces(len, terms, len * terms, threads, ALIGN) {
        let (piece, tail) = rest.split_at_mut(range.len());
        rest = tail;
        items.push((range.start, piece));
    }
    items
}

/// The model's float type of a result element type.
trait FloatOut {
    const PRECISION: Precision;
}

impl FloatOut for f64 {
    const PRECISION: Precision = Precision::Double;
}

impl FloatOut for f32 {
    const PRECISION: Precision = Precision::Single;
}

impl FloatOut for F16 {
    const PRECISION: Precision = Precision::Half;
}

/// `acc[i] = sum over terms of w * x[first + i]`, divided by `total`, [`DEQUANT_FUSE`] terms
/// per pass over `acc`, decoding each term for a model of `precision`.
fn add_terms(
    acc: &mut [f64],
    first: usize,
    terms: &[Codes<'_>],
    weights: &[f64],
    total: f64,
    precision: Precision,
) {
    let passes = terms.len().div_ceil(DEQUANT_FUSE);
    for pass in 0..passes {
        let range = pass * DEQUANT_FUSE..((pass + 1) * DEQUANT_FUSE).min(terms.len());
        let divide = (pass + 1 == passes).then_some(total);
        let group = Group {
            terms: &terms[range.clone()],
            weights: &weights[range],
            first,
            divide,
        };
        if pass == 0 {
            add_group::<true>(acc, &group, precision);
        } else {
            add_group::<false>(acc, &group, precision);
        }
    }
}

/// Terms added in one pass.
struct Group<'g, 'a> {
    terms: &'g [Codes<'a>],
    weights: &'g [f64],
    /// The key's element at `acc[0]`.
    first: usize,
    divide: Option<f64>,
}

/// Add `group` into `acc` with the decoder of its codec for a model of `precision`, compiled
/// for the widest vector instructions the CPU has.
fn add_group<const FIRST: bool>(acc: &mut [f64], group: &Group<'_, '_>, precision: Precision) {
    use Precision::{Double, Half, Single};
    simd::dispatch(
        #[inline(always)]
        || match (group.terms[0], precision) {
            (Codes::Blockwise { levels, block, .. }, _) => match (levels, precision) {
                (Levels::Int8, Double) => blockwise::<FIRST, Int8, Wide>(acc, group, block),
                (Levels::Int8, Single) => blockwise::<FIRST, Int8, Single32>(acc, group, block),
                (Levels::Int8, Half) => blockwise::<FIRST, Int8, Half16>(acc, group, block),
                (Levels::Int4, Double) => blockwise::<FIRST, Int4, Wide>(acc, group, block),
                (Levels::Int4, Single) => blockwise::<FIRST, Int4, Single32>(acc, group, block),
                (Levels::Int4, Half) => blockwise::<FIRST, Int4, Half16>(acc, group, block),
                (Levels::E3m0, Double) => blockwise::<FIRST, E3m0, Wide>(acc, group, block),
                (Levels::E3m0, Single) => blockwise::<FIRST, E3m0, Single32>(acc, group, block),
                (Levels::E3m0, Half) => blockwise::<FIRST, E3m0, Half16>(acc, group, block),
            },
            (Codes::Fp16(_), _) => fused::<FIRST, Sixteen<Halves>>(acc, group),
            (Codes::Bf16(_), Half) => fused::<FIRST, Sixteen<Brains<Half16>>>(acc, group),
            (Codes::Bf16(_), Single | Double) => fused::<FIRST, Sixteen<Brains<Wide>>>(acc, group),
        },
    );
}

/// Bytes ahead of the chunk being decoded that each term's codes are prefetched from: the
/// hardware prefetchers alone read interleaved streams of codes at a few GB/s.
const PREFETCH_AHEAD: usize = 2048;

/// Ask the CPU to bring the cache line of `codes[at]` in (past the end of `codes`, a line
/// that is never read: a prefetch does not fault).
#[inline(always)]
fn prefetch(codes: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing into the program and writes nothing, whatever the
    // address; the pointer is only computed (wrapping), never dereferenced.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            codes.as_ptr().wrapping_add(at).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (codes, at);
}

/// [`fused`] for blockwise terms of blocks of `block` values: one scale per chunk for blocks
/// of [`LANES`] or more.
#[inline(always)]
fn blockwise<const FIRST: bool, L: Level, R: Round>(
    acc: &mut [f64],
    group: &Group<'_, '_>,
    block: usize,
) {
    if block >= LANES {
        fused::<FIRST, Blockwise<L, R, true>>(acc, group);
    } else {
        fused::<FIRST, Blockwise<L, R, false>>(acc, group);
    }
}

/// Decodes one term's values as the model's float type holds them, widened to float64.
trait Decoder<'a>: Sized {
    fn new(codes: Codes<'a>) -> Self;
    /// Prefetch the codes [`PREFETCH_AHEAD`] bytes past those of value `start`.
    fn prefetch(&self, start: usize);
    /// Values `start..start + LANES` (`start` a multiple of [`LANES`]).
    fn chunk(&self, start: usize) -> [f64; LANES];
    /// Value `index`.
    fn one(&self, index: usize) -> f64;
}

/// `acc[i] = ((acc[i] + w_0 x_0[first + i]) + w_1 x_1[first + i]) + ...`, then `/ total` when
/// dividing; with `FIRST`, `0.0` stands for `acc[i]`, which is not read.
#[inline(always)]
fn fused<'a, const FIRST: bool, D: Decoder<'a>>(acc: &mut [f64], group: &Group<'_, 'a>) {
    let decoders: Vec<D> = group.terms.iter().map(|&codes| D::new(codes)).collect();
    let whole = acc.len() - acc.len() % LANES;
    let (body, tail) = acc.split_at_mut(whole);
    for (chunk, out) in body.chunks_exact_mut(LANES).enumerate() {
        let start = group.first + chunk * LANES;
        let mut sums: [f64; LANES] = if FIRST {
            [0.0; LANES]
        } else {
            out.try_into().expect("LANES long")
        };
        for (decoder, &weight) in decoders.iter().zip(group.weights) {
            decoder.prefetch(start);
            let x = decoder.chunk(start);
            for lane in 0..LANES {
                sums[lane] += weight * x[lane];
            }
        }
        if let Some(total) = group.divide {
            for value in &mut sums {
                *value /= total;
            }
        }
        out.copy_from_slice(&sums);
    }
    for (i, out) in tail.iter_mut().enumerate() {
        let index = group.first + whole + i;
        let mut sum = if FIRST { 0.0 } else { *out };
        for (decoder, &weight) in decoders.iter().zip(group.weights) {
            sum += weight * decoder.one(index);
        }
        *out = group.divide.map_or(sum, |total| sum / total);
    }
}

/// How a blockwise code's byte(s) give its level (as a float32: every level is one exactly).
trait Level {
    /// The byte that holds value `index`'s code.
    fn byte_of(index: usize) -> usize {
        index / 2
    }
    /// The levels of codes `start..start + LANES` (`start` even for 4-bit codes).
    fn chunk(codes: &[u8], start: usize) -> [f32; LANES];
    fn one(codes: &[u8], index: usize) -> f32;
}

struct Int8;
struct Int4;
struct E3m0;

impl Level for Int8 {
    fn byte_of(index: usize) -> usize {
        index
    }
    #[inline(always)]
    fn chunk(codes: &[u8], start: usize) -> [f32; LANES] {
        let bytes: &[u8; LANES] = codes[start..start + LANES].try_into().expect("LANES long");
        std::array::from_fn(|lane| f32::from(bytes[lane] as i8))
    }
    #[inline(always)]
    fn one(codes: &[u8], index: usize) -> f32 {
        f32::from(codes[index] as i8)
    }
}

/// The signed 4-bit code of value `index` (in -8..7).
#[inline(always)]
fn nibble(codes: &[u8], index: usize) -> i32 {
    i32::from((codes[index / 2] >> (4 * (index % 2))) & 0x0f) - 8
}

/// The signed 4-bit codes of values `start..start + LANES` (`start` even): value `l` of the
/// chunk is bits `4l..4l + 3` of its little-endian bytes, so each 32-bit word gives eight
/// values by a shift that depends on the lane alone.
#[inline(always)]
fn nibbles(codes: &[u8], start: usize) -> [i32; LANES] {
    let bytes: &[u8; LANES / 2] = codes[start / 2..start / 2 + LANES / 2]
        .try_into()
        .expect("LANES / 2 long");
    let words: [u32; LANES / 8] = std::array::from_fn(|word| {
        u32::from_le_bytes([
            bytes[4 * word],
            bytes[4 * word + 1],
            bytes[4 * word + 2],
            bytes[4 * word + 3],
        ])
    });
    std::array::from_fn(|lane| ((words[lane / 8] >> (4 * (lane % 8))) & 0x0f) as i32 - 8)
}

impl Level for Int4 {
    #[inline(always)]
    fn chunk(codes: &[u8], start: usize) -> [f32; LANES] {
        let codes = nibbles(codes, start);
        std::array::from_fn(|lane| codes[lane] as f32)
    }
    #[inline(always)]
    fn one(codes: &[u8], index: usize) -> f32 {
        nibble(codes, index) as f32
    }
}

/// The e3m0 level of a signed 4-bit code: `0.0` for 0, else `sign * 2^(|code| - 7)` (built
/// from its bits without a branch: the sign, and the exponent field `127 + |code| - 7`, all
/// cleared for code 0).
#[inline(always)]
fn e3m0_level(code: i32) -> f32 {
    let magnitude = code.unsigned_abs();
    let bits = ((code as u32) & 0x8000_0000) | ((120 + magnitude) << 23);
    let nonzero = 0u32.wrapping_sub(u32::from(magnitude != 0));
    f32::from_bits(bits & nonzero)
}

impl Level for E3m0 {
    #[inline(always)]
    fn chunk(codes: &[u8], start: usize) -> [f32; LANES] {
        let codes = nibbles(codes, start);
        std::array::from_fn(|lane| e3m0_level(codes[lane]))
    }
    #[inline(always)]
    fn one(codes: &[u8], index: usize) -> f32 {
        e3m0_level(nibble(codes, index))
    }
}

/// How a decoded value is rounded to the model's float type (and widened back).
trait Round {
    /// `level * scale`, exact, rounded to the model's type.
    fn product(level: f32, scale: f32) -> f64;
    /// A float32 value rounded to the model's type (as it is, for float32 and wider).
    #[inline(always)]
    fn single(value: f32) -> f64 {
        f64::from(value)
    }
}

/// A float64 model: the product is exact, a float32 stays as it is.
struct Wide;
/// A float32 model: the float32 product (the exact one rounded once).
struct Single32;
/// A float16 model: the exact product rounded once to a half.
struct Half16;

impl Round for Wide {
    #[inline(always)]
    fn product(level: f32, scale: f32) -> f64 {
        f64::from(level) * f64::from(scale)
    }
}

impl Round for Single32 {
    #[inline(always)]
    fn product(level: f32, scale: f32) -> f64 {
        f64::from(level * scale)
    }
}

impl Round for Half16 {
    #[inline(always)]
    fn product(level: f32, scale: f32) -> f64 {
        F16::from_f64(f64::from(level) * f64::from(scale)).to_f64()
    }
    #[inline(always)]
    fn single(value: f32) -> f64 {
        F16::from_f64(f64::from(value)).to_f64()
    }
}

/// A blockwise term: levels `L`, rounded to the model's type by `R`; `WIDE` when its blocks
/// hold [`LANES`] values or more.
struct Blockwise<'a, L, R, const WIDE: bool> {
    codes: &'a [u8],
    scales: &'a [f32],
    /// `log2` of the block size.
    shift: u32,
    codec: std::marker::PhantomData<(L, R)>,
}

impl<L, R, const WIDE: bool> Blockwise<'_, L, R, WIDE> {
    /// The scale of each value `start..start + LANES` (`start` a multiple of [`LANES`]): one
    /// when `WIDE`, else one per run of [`MIN_BLOCK`] values.
    #[inline(always)]
    fn scales_of(&self, start: usize) -> [f32; LANES] {
        if WIDE {
            return [self.scales[start >> self.shift]; LANES];
        }
        let runs: [f32; LANES / MIN_BLOCK] =
            std::array::from_fn(|run| self.scales[(start + run * MIN_BLOCK) >> self.shift]);
        std::array::from_fn(|lane| runs[lane / MIN_BLOCK])
    }
}

impl<'a, L: Level, R: Round, const WIDE: bool> Decoder<'a> for Blockwise<'a, L, R, WIDE> {
    fn new(codes: Codes<'a>) -> Self {
        let Codes::Blockwise {
            codes,
            scales,
            block,
            ..
        } = codes
        else {
            unreachable!("a group holds one codec")
        };
        Self {
            codes,
            scales,
            shift: block.trailing_zeros(),
            codec: std::marker::PhantomData,
        }
    }
    #[inline(always)]
    fn prefetch(&self, start: usize) {
        prefetch(self.codes, L::byte_of(start) + PREFETCH_AHEAD);
    }
    #[inline(always)]
    fn chunk(&self, start: usize) -> [f64; LANES] {
        let levels = L::chunk(self.codes, start);
        let scales = self.scales_of(start);
        std::array::from_fn(|lane| R::product(levels[lane], scales[lane]))
    }
    #[inline(always)]
    fn one(&self, index: usize) -> f64 {
        R::product(L::one(self.codes, index), self.scales[index >> self.shift])
    }
}

/// The little-endian 16-bit code of value `index`.
#[inline(always)]
fn bits16(codes: &[u8], index: usize) -> u16 {
    u16::from_le_bytes([codes[2 * index], codes[2 * index + 1]])
}

/// The 16-bit codes of values `start..start + LANES`.
#[inline(always)]
fn chunk16(codes: &[u8], start: usize) -> [u16; LANES] {
    let bytes: &[u8; 2 * LANES] = codes[2 * start..2 * (start + LANES)]
        .try_into()
        .expect("2 * LANES long");
    std::array::from_fn(|lane| u16::from_le_bytes([bytes[2 * lane], bytes[2 * lane + 1]]))
}

/// The float32 of a half's bits (exact), without a branch: the half's exponent and mantissa
/// fields placed in a float32's and multiplied by `2^112` (the difference of the exponent
/// biases; exact, for a subnormal half too), an infinity or NaN keeping its payload's bits as
/// NumPy's cast does.
#[inline(always)]
fn half_to_f32(bits: u16) -> f32 {
    let bits = u32::from(bits);
    let sign = (bits & 0x8000) << 16;
    let rest = bits & 0x7fff;
    let scaled = (f32::from_bits(rest << 13) * f32::from_bits((127 + 112) << 23)).to_bits();
    let special = (rest << 13) | 0x7f80_0000;
    f32::from_bits(sign | if rest >= 0x7c00 { special } else { scaled })
}

/// How a 16-bit code becomes the model's value.
trait Float16 {
    fn value(bits: u16) -> f64;
}

/// fp16: every half is exactly a value of any model's float type (16 bits or wider).
struct Halves;

impl Float16 for Halves {
    #[inline(always)]
    fn value(bits: u16) -> f64 {
        f64::from(half_to_f32(bits))
    }
}

/// bf16: the float32 of its bits, rounded to the model's type by `R`.
struct Brains<R>(std::marker::PhantomData<R>);

impl<R: Round> Float16 for Brains<R> {
    #[inline(always)]
    fn value(bits: u16) -> f64 {
        R::single(f32::from_bits(u32::from(bits) << 16))
    }
}

/// A term of 16-bit codes, decoded by `F`.
struct Sixteen<'a, F>(&'a [u8], std::marker::PhantomData<F>);

impl<'a, F: Float16> Decoder<'a> for Sixteen<'a, F> {
    fn new(codes: Codes<'a>) -> Self {
        let (Codes::Fp16(codes) | Codes::Bf16(codes)) = codes else {
            unreachable!("a group holds one codec")
        };
        Self(codes, std::marker::PhantomData)
    }
    #[inline(always)]
    fn prefetch(&self, start: usize) {
        prefetch(self.0, 2 * start + PREFETCH_AHEAD);
    }
    #[inline(always)]
    fn chunk(&self, start: usize) -> [f64; LANES] {
        let codes = chunk16(self.0, start);
        std::array::from_fn(|lane| F::value(codes[lane]))
    }
    #[inline(always)]
    fn one(&self, index: usize) -> f64 {
        F::value(bits16(self.0, index))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The reference: decode as NumPy does (exact float64 product, rounded to the model's
    /// type) and average in the specified order.
    fn reference(
        terms: &[Codes<'_>],
        weights: &[f64],
        len: usize,
        precision: Precision,
    ) -> Vec<f64> {
        let round = |x: f64| match precision {
            Precision::Double => x,
            Precision::Single => f64::from(x as f32),
            Precision::Half => F16::from_f64(x).to_f64(),
        };
        let total = weights.iter().fold(0.0, |t, w| t + w);
        (0..len)
            .map(|i| {
                let mut acc = 0.0;
                for (codes, &w) in terms.iter().zip(weights) {
                    let x = match *codes {
                        Codes::Blockwise {
                            levels,
                            codes,
                            scales,
                            block,
                        } => {
                            let level = match levels {
                                Levels::Int8 => f64::from(codes[i] as i8),
                                Levels::Int4 => f64::from(nibble(codes, i)),
                                Levels::E3m0 => {
                                    let c = nibble(codes, i);
                                    if c == 0 {
                                        0.0
                                    } else {
                                        f64::from(c.signum()) * 2f64.powi(c.abs() - 7)
                                    }
                                }
                            };
                            round(level * f64::from(scales[i / block]))
                        }
                        Codes::Fp16(codes) => F16(bits16(codes, i)).to_f64(),
                        Codes::Bf16(codes) => {
                            round(f64::from(f32::from_bits(u32::from(bits16(codes, i)) << 16)))
                        }
                    };
                    acc += w * x;
                }
                round(acc / total)
            })
            .collect()
    }

    fn values(data: &ArrayData<'_>) -> Vec<f64> {
        match data {
            ArrayData::F64(v) => v.to_vec(),
            ArrayData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            ArrayData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            _ => unreachable!(),
        }
    }

    fn same_bits(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    /// For `nodes` nodes: `2 * len` code bytes each (any bits), `len` scales each (some
    /// negative), and a weight each.
    pub(crate) fn sample_inputs(
        nodes: usize,
        len: usize,
    ) -> (Vec<Vec<u8>>, Vec<Vec<f32>>, Vec<f64>) {
        let bytes = (0..nodes)
            .map(|n| {
                (0..2 * len)
                    .map(|i| ((i * 73 + n * 29 + i / 7) % 256) as u8)
                    .collect()
            })
            .collect();
        let scales = (0..nodes)
            .map(|n| {
                (0..len)
                    .map(|b| ((b * 13 + n) % 17) as f32 * 0.37 - 1.0)
                    .collect()
            })
            .collect();
        let weights = (0..nodes).map(|n| 0.25 + n as f64 * 1.3).collect();
        (bytes, scales, weights)
    }

    #[test]
    fn every_codec_and_precision_matches_decode_then_average() {
        let len = 2 * DEQUANT_BLOCK + 37;
        let nodes = 11;
        let (bytes, scales, weights) = sample_inputs(nodes, len);
        for block in [8, 16, 128] {
            let blocks = len.div_ceil(block);
            let blockwise = |levels: Levels, n: usize| Codes::Blockwise {
                levels,
                codes: if levels == Levels::Int8 {
                    &bytes[n][..len]
                } else {
                    &bytes[n][..len.div_ceil(2)]
                },
                scales: &scales[n][..blocks],
                block,
            };
            let sets: Vec<Vec<Codes<'_>>> = vec![
                (0..nodes).map(|n| blockwise(Levels::Int8, n)).collect(),
                (0..nodes).map(|n| blockwise(Levels::Int4, n)).collect(),
                (0..nodes).map(|n| blockwise(Levels::E3m0, n)).collect(),
                (0..nodes).map(|n| Codes::Fp16(&bytes[n][..])).collect(),
                (0..nodes).map(|n| Codes::Bf16(&bytes[n][..])).collect(),
            ];
            for terms in &sets {
                for precision in [Precision::Double, Precision::Single, Precision::Half] {
                    for count in [1, 2, nodes] {
                        let got =
                            dequantise_average(&terms[..count], &weights[..count], len, precision)
                                .unwrap();
                        let expected =
                            reference(&terms[..count], &weights[..count], len, precision);
                        assert!(
                            same_bits(&values(&got), &expected),
                            "{:?} {precision:?} {count}",
                            terms[0]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pieces_are_whole_chunks_of_whole_bytes() {
        let ranges: Vec<_> = parallel::pieces(1_000_003, 100, 100_000_300, 2, ALIGN).collect();
        assert!(ranges.len() > 1);
        assert!(ranges[..ranges.len() - 1]
            .iter()
            .all(|r| r.len() % ALIGN == 0));
        assert_eq!(ALIGN % LANES, 0);
    }

    #[test]
    fn mismatched_codecs_sizes_and_weights_are_errors() {
        let codes = [0u8; 16];
        let scales = [1.0f32; 2];
        let int8 = Codes::Blockwise {
            levels: Levels::Int8,
            codes: &codes,
            scales: &scales,
            block: 8,
        };
        let int4 = Codes::Blockwise {
            levels: Levels::Int4,
            codes: &codes[..8],
            scales: &scales,
            block: 8,
        };
        assert_eq!(
            dequantise_average(&[int8, int4], &[1.0, 1.0], 16, Precision::Single),
            Err(DequantError::MixedCodecs { index: 1 })
        );
        assert!(matches!(
            dequantise_average(&[int8], &[1.0], 15, Precision::Single),
            Err(DequantError::Size { index: 0, .. })
        ));
        assert_eq!(
            dequantise_average(&[int8], &[0.0], 16, Precision::Single),
            Err(DequantError::ZeroWeights)
        );
        assert!(matches!(
            dequantise_average(&[int8], &[-1.0], 16, Precision::Single),
            Err(DequantError::Weights(AverageError::InvalidWeight { .. }))
        ));
    }
}
