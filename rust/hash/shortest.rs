//! The fast path of [`super::float_repr::write_float`]: normal doubles with a nonzero
//! significand field (all but zero, subnormals and powers of two), written in Python's layout
//! straight from their shortest digits.
//!
//! The digits come from the scalar core of zmij's Schubfach-family algorithm (`to_decimal`
//! and its table of powers of ten, ported from zmij 1.0.23, MIT licence, by Victor Zverovich
//! and David Tolnay): the same digits as [`zmij::Buffer::format_finite`], which remains the
//! general path. What differs is the layout: zmij moves its digits with variable-length
//! `memmove`/`memset` calls for fixed notation (a third of its time on gradient-like values);
//! here the text is written with a few overlapping fixed-size stores, straight into the block
//! of text, and the digits are converted with SSE2 on x86-64 as zmij does.

/// Bytes of `out` that [`write_normal`] may overwrite (the text itself is at most
/// [`super::float_repr::MAX_FLOAT_LEN`] bytes).
pub const ROOM: usize = 40;

/// A 128-bit number as two halves.
#[derive(Clone, Copy)]
struct U128 {
    hi: u64,
    lo: u64,
}

/// The high 64 bits of `x * y`.
const fn umul128_hi64(x: u64, y: u64) -> u64 {
    ((x as u128 * y as u128) >> 64) as u64
}

/// The high 128 bits of the 192-bit product of `x_hi:x_lo` and `y`.
#[inline(always)]
fn umul192_hi128(x_hi: u64, x_lo: u64, y: u64) -> U128 {
    let p = u128::from(x_hi) * u128::from(y);
    let lo = (p as u64).wrapping_add(umul128_hi64(x_lo, y));
    U128 {
        hi: (p >> 64) as u64 + u64::from(lo < p as u64),
        lo,
    }
}

/// `floor(log10(2^bin_exp))`.
#[inline(always)]
const fn dec_exp_of(bin_exp: i32) -> i32 {
    (bin_exp * 315_653) >> 20
}

/// The shift that puts the binary point of `significand << shift * 10^-(dec_exp)` at a fixed
/// bit (before zmij's extra shift).
#[inline(always)]
const fn exp_shift(bin_exp: i32, dec_exp: i32) -> i32 {
    // floor(log2(10^-dec_exp))
    let pow10_bin_exp = (-dec_exp * 217_707) >> 16;
    bin_exp + pow10_bin_exp + 1
}

#[rustfmt::skip]
const POW10_MINOR: [u64; 28] = [
    0x8000000000000000, 0xa000000000000000, 0xc800000000000000,
    0xfa00000000000000, 0x9c40000000000000, 0xc350000000000000,
    0xf424000000000000, 0x9896800000000000, 0xbebc200000000000,
    0xee6b280000000000, 0x9502f90000000000, 0xba43b74000000000,
    0xe8d4a51000000000, 0x9184e72a00000000, 0xb5e620f480000000,
    0xe35fa931a0000000, 0x8e1bc9bf04000000, 0xb1a2bc2ec5000000,
    0xde0b6b3a76400000, 0x8ac7230489e80000, 0xad78ebc5ac620000,
    0xd8d726b7177a8000, 0x878678326eac9000, 0xa968163f0a57b400,
    0xd3c21bcecceda100, 0x84595161401484a0, 0xa56fa5b99019a5c8,
    0xcecb8f27f4200f3a,
];

#[rustfmt::skip]
const POW10_MAJOR: [U128; 23] = [
    U128 { hi: 0xaf8e5410288e1b6f, lo: 0x07ecf0ae5ee44dda }, // -303
    U128 { hi: 0xb1442798f49ffb4a, lo: 0x99cd11cfdf41779d }, // -275
    U128 { hi: 0xb2fe3f0b8599ef07, lo: 0x861fa7e6dcb4aa15 }, // -247
    U128 { hi: 0xb4bca50b065abe63, lo: 0x0fed077a756b53aa }, // -219
    U128 { hi: 0xb67f6455292cbf08, lo: 0x1a3bc84c17b1d543 }, // -191
    U128 { hi: 0xb84687c269ef3bfb, lo: 0x3d5d514f40eea742 }, // -163
    U128 { hi: 0xba121a4650e4ddeb, lo: 0x92f34d62616ce413 }, // -135
    U128 { hi: 0xbbe226efb628afea, lo: 0x890489f70a55368c }, // -107
    U128 { hi: 0xbdb6b8e905cb600f, lo: 0x5400e987bbc1c921 }, //  -79
    U128 { hi: 0xbf8fdb78849a5f96, lo: 0xde98520472bdd034 }, //  -51
    U128 { hi: 0xc16d9a0095928a27, lo: 0x75b7053c0f178294 }, //  -23
    U128 { hi: 0xc350000000000000, lo: 0x0000000000000000 }, //    5
    U128 { hi: 0xc5371912364ce305, lo: 0x6c28000000000000 }, //   33
    U128 { hi: 0xc722f0ef9d80aad6, lo: 0x424d3ad2b7b97ef6 }, //   61
    U128 { hi: 0xc913936dd571c84c, lo: 0x03bc3a19cd1e38ea }, //   89
    U128 { hi: 0xcb090c8001ab551c, lo: 0x5cadf5bfd3072cc6 }, //  117
    U128 { hi: 0xcd036837130890a1, lo: 0x36dba887c37a8c10 }, //  145
    U128 { hi: 0xcf02b2c21207ef2e, lo: 0x94f967e45e03f4bc }, //  173
    U128 { hi: 0xd106f86e69d785c7, lo: 0xe13336d701beba52 }, //  201
    U128 { hi: 0xd31045a8341ca07c, lo: 0x1ede48111209a051 }, //  229
    U128 { hi: 0xd51ea6fa85785631, lo: 0x552a74227f3ea566 }, //  257
    U128 { hi: 0xd732290fbacaf133, lo: 0xa97c177947ad4096 }, //  285
    U128 { hi: 0xd94ad8b1c7380874, lo: 0x18375281ae7822bc }, //  313
];

#[rustfmt::skip]
const POW10_FIXUPS: [u32; 20] = [
    0x0a4e363f, 0x00001840, 0x00006400, 0x24200040, 0x00000000,
    0x0c000000, 0x82c81380, 0x5e4ce01f, 0xd730f60f, 0x0000001b,
    0x00000000, 0xcdf7fffc, 0x6e8201d8, 0x40cd3fd1, 0xdb642501,
    0x00000d0d, 0x14042400, 0x53713840, 0x11781db4, 0x00000000,
];

/// The decimal exponent of the first entry of [`POW10`].
const POW10_MIN_EXP: i32 = -293;

/// 128-bit significands of `10^(POW10_MIN_EXP + i)`, rounded down.
static POW10: [U128; 618] = {
    let mut table = [U128 { hi: 0, lo: 0 }; 618];
    let mut i = 0;
    while i < table.len() {
        table[i] = pow10_significand(i);
        i += 1;
    }
    table
};

/// Entry `i` of [`POW10`], from a minor and a major power (Dougall Johnson's method).
const fn pow10_significand(i: usize) -> U128 {
    let m = POW10_MINOR[(i + 10) % POW10_MINOR.len()];
    let h = POW10_MAJOR[(i + 10) / POW10_MINOR.len()];
    let h1 = umul128_hi64(h.lo, m);
    let c0 = h.lo.wrapping_mul(m);
    let c1 = h1.wrapping_add(h.hi.wrapping_mul(m));
    let c2 = (c1 < h1) as u64 + umul128_hi64(h.hi, m);
    let mut result = if (c2 >> 63) != 0 {
        U128 { hi: c2, lo: c1 }
    } else {
        U128 {
            hi: (c2 << 1) | (c1 >> 63),
            lo: (c1 << 1) | (c0 >> 63),
        }
    };
    result.lo -= ((POW10_FIXUPS[i >> 5] >> (i & 31)) & 1) as u64;
    result
}

/// The shortest decimal of a double: `sig` (15 or 16 digits, from `10^15` up when there is an
/// extra leading digit), then `last_digit` when `has_last_digit`, times `10^exp`.
struct Decimal {
    sig: u64,
    exp: i32,
    last_digit: u64,
    has_last_digit: bool,
}

/// zmij's `to_decimal` for a double with the given significand (implicit bit included) and
/// biased exponent field (1..=2046), its significand field nonzero.
#[inline(always)]
fn to_decimal(bin_sig: u64, raw_exp: i32) -> Decimal {
    const EXTRA_SHIFT: u32 = 6;
    let bin_exp = raw_exp - 1075;
    let dec_exp = dec_exp_of(bin_exp);
    let shift = (exp_shift(bin_exp, dec_exp + 1) + EXTRA_SHIFT as i32) as u32;
    let even = 1 - (bin_sig & 1);
    let pow10 = POW10[(-dec_exp - 1 - POW10_MIN_EXP) as usize];
    let p = umul192_hi128(pow10.hi, pow10.lo, bin_sig << shift);

    let mut integral = p.hi >> EXTRA_SHIFT;
    let fractional = (p.hi << (64 - EXTRA_SHIFT)) | (p.lo >> EXTRA_SHIFT);
    let half_ulp = (pow10.hi >> (EXTRA_SHIFT + 1 - shift)) + even;
    let round_up = fractional.wrapping_add(half_ulp) < fractional;
    let round_down = half_ulp > fractional;
    integral += u64::from(round_up);

    // The digit after `integral`, rounded to nearest (the +6 covers boundary cases found by
    // zmij's exhaustive verification), ties to even.
    let biased_half = (1u128 << 63) + 6;
    let mut digit = ((u128::from(fractional) * 10 + biased_half) >> 64) as u64;
    if fractional == 1 << 62 {
        digit = 2;
    }
    Decimal {
        sig: integral,
        exp: dec_exp,
        last_digit: digit,
        has_last_digit: !(round_up || round_down),
    }
}

/// The 8 decimal digits of `x < 10^8` (leading zeros included) as byte values 0..=9, the
/// first digit in the lowest byte.
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn eight_digits(x: u64) -> u64 {
    debug_assert!(x < 100_000_000);
    // Two 4-digit halves in 32-bit lanes, then 2-digit quarters in 16-bit lanes, then digits;
    // each lane's quotient by multiply and shift (exact below 10^4, 10^2).
    let v = (x / 10_000) | ((x % 10_000) << 32);
    let hundreds = ((v * 10_486) >> 20) & 0x0000_007F_0000_007F;
    let v = hundreds | (v - hundreds * 100) << 16;
    let tens = ((v * 103) >> 10) & 0x000F_000F_000F_000F;
    tens | (v - tens * 10) << 8
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m128i, _mm_add_epi64, _mm_and_si128, _mm_andnot_si128, _mm_cmpgt_epi8, _mm_cvtsi128_si32,
    _mm_cvtsi32_si128, _mm_movemask_epi8, _mm_mul_epu32, _mm_mulhi_epu16, _mm_mullo_epi16,
    _mm_or_si128, _mm_set1_epi16, _mm_set1_epi32, _mm_set1_epi64x, _mm_set1_epi8, _mm_set_epi64x,
    _mm_setzero_si128, _mm_shuffle_epi32, _mm_slli_epi16, _mm_slli_epi32, _mm_slli_si128,
    _mm_srli_epi16, _mm_srli_epi64, _mm_srli_si128, _mm_storeu_si128, _mm_sub_epi16,
};

/// Sixteen bytes (digits or text), the first in the lowest byte: an SSE2 register on x86-64
/// (SSE2 is part of every x86-64 CPU, the target's baseline), a `u128` elsewhere. Each
/// operation is a few instructions without branches; kept in a vector register, the digits
/// need no moves to and from general registers.
#[derive(Clone, Copy)]
struct Bytes16(
    #[cfg(target_arch = "x86_64")] __m128i,
    #[cfg(not(target_arch = "x86_64"))] u128,
);

#[cfg(target_arch = "x86_64")]
impl Bytes16 {
    /// The 16 digits of `x < 10^16` (leading zeros included) as byte values 0..=9 (zmij's
    /// SSE2 `to_digits_64`): the four 4-digit quarters side by side in 32-bit lanes, split into
    /// 2-digit halves and digits as `eight_digits` does.
    #[inline(always)]
    fn digits(x: u64) -> Self {
        debug_assert!(x < 10_000_000_000_000_000);
        let (high, low) = (x / 100_000_000, x % 100_000_000);
        // SAFETY: SSE2 is available (see the type); no memory is accessed.
        unsafe {
            // Each 64-bit lane n (< 10^8) becomes (n / 10^4) << 32 | n % 10^4: n + (2^32 - 10^4)
            // * floor(n / 10^4), the quotient by multiply and shift (exact below 10^8).
            let halves = _mm_set_epi64x(low as i64, high as i64);
            let quotients = _mm_srli_epi64::<40>(_mm_mul_epu32(
                halves,
                _mm_set1_epi64x((1i64 << 40) / 10_000 + 1),
            ));
            let split = _mm_add_epi64(
                halves,
                _mm_mul_epu32(quotients, _mm_set1_epi64x((1 << 32) - 10_000)),
            );
            // The quarters in text order: high / 10^4, high % 10^4, low / 10^4, low % 10^4.
            let quarters = _mm_shuffle_epi32::<0b10_11_00_01>(split);
            // Per 32-bit lane q < 10^4: (q % 100) << 16 | q / 100 (q * 5243 >> 19 = q / 100).
            let div100 = _mm_srli_epi16::<3>(_mm_mulhi_epu16(quarters, _mm_set1_epi32(5243)));
            let mod100 = _mm_sub_epi16(quarters, _mm_mullo_epi16(div100, _mm_set1_epi32(100)));
            let pairs = _mm_or_si128(_mm_slli_epi32::<16>(mod100), div100);
            // Per 16-bit lane p < 100: (p % 10) << 8 | p / 10 = (p << 8) - 2559 * (p / 10).
            let tens = _mm_mulhi_epu16(pairs, _mm_set1_epi16(6554));
            Bytes16(_mm_sub_epi16(
                _mm_slli_epi16::<8>(pairs),
                _mm_mullo_epi16(tens, _mm_set1_epi16(2559)),
            ))
        }
    }

    /// How many bytes there are up to the last nonzero one (16 minus the trailing zero bytes).
    #[inline(always)]
    fn used(self) -> u32 {
        // SAFETY: as in `digits`.
        let nonzero = unsafe { _mm_movemask_epi8(_mm_cmpgt_epi8(self.0, _mm_setzero_si128())) };
        32 - (nonzero as u32).leading_zeros()
    }

    /// `'0'` added to every byte (digit values to their text).
    #[inline(always)]
    fn text(self) -> Self {
        // SAFETY: as in `digits`.
        Bytes16(unsafe { _mm_or_si128(self.0, _mm_set1_epi8(b'0' as i8)) })
    }

    /// Bytes 1..16, then `last`.
    #[inline(always)]
    fn shift_in(self, last: u8) -> Self {
        // SAFETY: as in `digits`.
        Bytes16(unsafe {
            _mm_or_si128(
                _mm_srli_si128::<1>(self.0),
                _mm_slli_si128::<15>(_mm_cvtsi32_si128(i32::from(last))),
            )
        })
    }

    /// `self` if `condition`, else `other`.
    #[inline(always)]
    fn or_else(self, condition: bool, other: Self) -> Self {
        // SAFETY: as in `digits`.
        Bytes16(unsafe {
            let mask = _mm_set1_epi8(-i8::from(condition));
            _mm_or_si128(_mm_and_si128(mask, self.0), _mm_andnot_si128(mask, other.0))
        })
    }

    /// The first byte.
    #[inline(always)]
    fn first(self) -> u8 {
        // SAFETY: as in `digits`.
        unsafe { _mm_cvtsi128_si32(self.0) as u8 }
    }

    /// The bytes.
    #[inline(always)]
    fn bytes(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        // SAFETY: as in `digits`; the store writes the 16 bytes of `bytes`.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), self.0) };
        bytes
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl Bytes16 {
    #[inline(always)]
    fn digits(x: u64) -> Self {
        Bytes16(
            u128::from(eight_digits(x / 100_000_000))
                | u128::from(eight_digits(x % 100_000_000)) << 64,
        )
    }

    #[inline(always)]
    fn used(self) -> u32 {
        16 - self.0.leading_zeros() / 8
    }

    #[inline(always)]
    fn text(self) -> Self {
        Bytes16(self.0 | u128::from_le_bytes([b'0'; 16]))
    }

    #[inline(always)]
    fn shift_in(self, last: u8) -> Self {
        Bytes16(self.0 >> 8 | u128::from(last) << 120)
    }

    #[inline(always)]
    fn or_else(self, condition: bool, other: Self) -> Self {
        if condition {
            self
        } else {
            other
        }
    }

    #[inline(always)]
    fn first(self) -> u8 {
        self.0 as u8
    }

    #[inline(always)]
    fn bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
}

/// Write `x` (normal, with a nonzero significand field) as Python's `repr` does at the start
/// of `out`; return the length.
///
/// The text is only stored, never read back: built in a scratch buffer and copied out, the
/// loads of the copy would wait on the narrower stores before them (no store forwarding).
#[inline(always)]
pub fn write_normal(x: f64, out: &mut [u8; ROOM]) -> usize {
    let bits = x.to_bits();
    let negative = (bits >> 63) as usize;
    let raw_exp = ((bits >> 52) & 0x7FF) as i32;
    debug_assert!(raw_exp != 0 && raw_exp != 0x7FF && bits << 12 != 0);
    let dec = to_decimal((bits & ((1 << 52) - 1)) | 1 << 52, raw_exp);

    // Branch-free below: which of these hold varies from value to value without a pattern.
    let extra = dec.sig >= 1_000_000_000_000_000;
    // The decimal exponent of the first digit, as in `d.ddd * 10^exp`.
    let exp = dec.exp + 15 + i32::from(extra);
    // The 16 digit places of `sig` (without the extra digit, the first is a padding zero).
    let places = Bytes16::digits(dec.sig);
    // How many digits the text has: all of `sig` and the last digit, or `sig` without its
    // trailing zeros.
    let (extra_digit, has_last) = (usize::from(extra), usize::from(dec.has_last_digit));
    let digits =
        has_last * (16 + extra_digit) + (1 - has_last) * (places.used() as usize - 1 + extra_digit);
    let last = b'0' + dec.last_digit as u8 * has_last as u8;
    // The first 16 digits (`'0'` after the last), and the 17th.
    let first16 = places.text().or_else(extra, places.text().shift_in(last));
    let seventeenth = if extra { last } else { b'0' };

    // Python's fixed notation (for 1e-4 <= |x| < 1e16) is `0.000ddd`, `d.ddd` or `ddd.ddd`;
    // its exponent notation starts with `d.ddd`. The text is written with a few overlapping
    // fixed-size stores: no loads of what was just stored, and no shifts by a variable amount
    // for the point after the first character (every value below 10 in magnitude).
    let fixed = (-4..16).contains(&exp);
    out[0] = b'-';
    let out = &mut out[negative..];
    let len = if fixed && exp > 0 {
        // `ddd.ddd`: the point after the first `point` digits.
        let point = exp as usize + 1;
        let first16 = first16.bytes();
        out[..16].copy_from_slice(&first16);
        let after = (u128::from_le_bytes(first16) >> (8 * point - 8)) >> 8;
        out[point + 1..point + 17].copy_from_slice(&after.to_le_bytes());
        out[point] = b'.';
        out[17] = seventeenth;
        digits.max(point + 1) + 1
    } else {
        // `d.ddd` or `0.000ddd`: the digits after `zeros` zeros, the point after the first.
        let zeros = if fixed { -exp as usize } else { 0 };
        out[..8].copy_from_slice(b"0.000000");
        out[0] = if zeros == 0 { first16.first() } else { b'0' };
        let rest = first16.shift_in(0).or_else(zeros == 0, first16);
        out[1 + zeros.max(1)..17 + zeros.max(1)].copy_from_slice(&rest.bytes());
        out[17 + zeros] = seventeenth;
        (zeros + digits).max(2) + 1
    };
    if fixed {
        return negative + len;
    }
    // `d.ddde-05`, `de+16`: the exponent with a sign and at least two digits.
    let at = if digits > 1 { len } else { 1 };
    let magnitude = exp.unsigned_abs() as u64;
    let sign = if exp < 0 { b'-' } else { b'+' };
    let (hundreds, rest) = (magnitude / 100, magnitude % 100);
    let tail = [b'0' + (rest / 10) as u8, b'0' + (rest % 10) as u8];
    let exponent = if hundreds > 0 {
        u64::from_le_bytes([b'e', sign, b'0' + hundreds as u8, tail[0], tail[1], 0, 0, 0])
    } else {
        u64::from_le_bytes([b'e', sign, tail[0], tail[1], 0, 0, 0, 0])
    };
    out[at..at + 8].copy_from_slice(&exponent.to_le_bytes());
    negative + at + 4 + usize::from(hundreds > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::float_repr::tests::xorshift;

    #[test]
    fn eight_digits_of_every_shape() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let samples = (0..200_000u64).map(|_| xorshift(&mut state) % 100_000_000);
        let edges = [0, 1, 9, 10, 99, 100, 9_999, 10_000, 10_001, 99_999_999];
        for x in samples.chain(edges).chain((0..100_000_000).step_by(9_973)) {
            let bytes = (eight_digits(x) | u64::from_le_bytes([b'0'; 8])).to_le_bytes();
            assert_eq!(std::str::from_utf8(&bytes).unwrap(), format!("{x:08}"));
        }
    }

    #[test]
    fn bytes16_operations_match_their_u128_definitions() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let samples = (0..200_000u64).map(|_| xorshift(&mut state) % 10_000_000_000_000_000);
        let edges = [
            0,
            1,
            99_999_999,
            100_000_000,
            1_000_000_000_000_000,
            9_999_999_999_999_999,
        ];
        for x in samples.chain(edges) {
            let digits = Bytes16::digits(x);
            let halves = u128::from(eight_digits(x / 100_000_000))
                | u128::from(eight_digits(x % 100_000_000)) << 64;
            let value = |bytes: Bytes16| u128::from_le_bytes(bytes.bytes());
            assert_eq!(value(digits), halves, "{x}");
            assert_eq!(digits.used(), 16 - halves.leading_zeros() / 8, "{x}");
            let text = halves | u128::from_le_bytes([b'0'; 16]);
            assert_eq!(value(digits.text()), text);
            assert_eq!(digits.text().first(), text as u8);
            let last = b'0' + (x % 10) as u8;
            assert_eq!(
                value(digits.text().shift_in(last)),
                text >> 8 | u128::from(last) << 120
            );
            for condition in [false, true] {
                let chosen = digits.or_else(condition, digits.text());
                assert_eq!(value(chosen), if condition { halves } else { text });
            }
        }
    }

    #[test]
    fn powers_of_ten_match_their_exact_values() {
        // 10^0 and 10^27 are exact in 128 bits; 10^-1's significand is 0xcccc...c rounded down.
        assert_eq!(POW10[(-POW10_MIN_EXP) as usize].hi, 1 << 63);
        let ten_27 = 10u128.pow(27);
        let normalised = ten_27 << ten_27.leading_zeros();
        let entry = POW10[(27 - POW10_MIN_EXP) as usize];
        assert_eq!(
            (entry.hi, entry.lo),
            ((normalised >> 64) as u64, normalised as u64)
        );
        let tenth = POW10[(-1 - POW10_MIN_EXP) as usize];
        assert_eq!(
            (tenth.hi, tenth.lo),
            (0xCCCC_CCCC_CCCC_CCCC, 0xCCCC_CCCC_CCCC_CCCC)
        );
    }
}
