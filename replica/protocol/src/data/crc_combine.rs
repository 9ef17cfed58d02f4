//! crc32c of a concatenation from the crcs of its parts, in constant time.
//!
//! Why: an engine checksums a write's payload once and derives each replica's frame
//! trailer from that crc and the frame's own header ([`super::frame`]). The `crc32c`
//! crate's combine rebuilds 32×32 bit matrices for every bit of the length on every
//! call: ~4 µs per 4 KiB frame, measured as 60 % of the load generator's CPU in the
//! replica benchmark's write phase — more than checksumming the payload again. Here
//! the operator "append `n` zero bytes" is a multiplication by x^(8n) modulo the
//! CRC-32C polynomial, built from a table of x^(2^k) computed at compile time: at
//! most one 32-step carry-less multiplication per set bit of `n`.
//!
//! Polynomials are kept in the crc's reflected bit order: bit 31 is the coefficient
//! of x^0, bit 0 that of x^31.

/// The CRC-32C (Castagnoli) polynomial, reflected.
const POLY: u32 = 0x82F6_3B78;

/// x^0 in reflected order.
const ONE: u32 = 1 << 31;

/// `X2K[k]` = x^(2^k) mod P. A `u64` length in bytes is at most 2^67 bits, so 67
/// entries cover every power the multiplication by x^(8n) needs.
const X2K: [u32; 67] = {
    let mut t = [0u32; 67];
    t[0] = ONE >> 1; // x^1
    let mut k = 1;
    while k < t.len() {
        t[k] = mul_mod(t[k - 1], t[k - 1]);
        k += 1;
    }
    t
};

/// a·b mod P. Walks `a`'s coefficients from x^0 up while `b` is multiplied by x.
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = ONE;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        // b·x: a shift towards higher powers, folding x^32 back with the polynomial.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// x^(8·len) mod P: the effect of `len` zero bytes on a crc register.
fn zero_bytes_operator(len: u64) -> u32 {
    let mut op = ONE;
    let mut rest = len;
    // 8·len = len·2^3: bit j of `len` is bit j+3 of the bit count.
    let mut k = 3;
    while rest != 0 {
        if rest & 1 != 0 {
            op = mul_mod(X2K[k], op);
        }
        rest >>= 1;
        k += 1;
    }
    op
}

/// crc32c(A ‖ B) from crc32c(A), crc32c(B) and B's length. The crc's initial and
/// final inversions cancel out, so the standard register-level identity applies.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    if len_b == 0 {
        return crc_a;
    }
    mul_mod(zero_bytes_operator(len_b as u64), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_checksumming_the_concatenation() {
        let data: Vec<u8> = (0..(1usize << 20) + 1024)
            .map(|i| (i * 131 % 253) as u8)
            .collect();
        for (a, b) in [
            (0, 0),
            (0, 1),
            (1, 0),
            (7, 1),
            (28, 4096),
            (28, 4095),
            (3, 65537),
            (28, 1 << 20),
            (1000, (1 << 20) + 3 - 1000),
        ] {
            let (x, y) = (&data[..a], &data[a..a + b]);
            let whole = crc32c::crc32c_append(crc32c::crc32c(x), y);
            assert_eq!(
                crc32c_combine(crc32c::crc32c(x), crc32c::crc32c(y), y.len()),
                whole,
                "parts of {a} and {b} bytes"
            );
        }
    }

    #[test]
    fn agrees_with_the_crates_combine_on_huge_lengths() {
        // No buffer this long exists here; the reference is the crate's (slow) combine.
        for len in [1usize << 32, (1 << 40) + 12345, usize::MAX / 2] {
            assert_eq!(
                crc32c_combine(0x1234_5678, 0x9abc_def0, len),
                crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, len),
                "length {len}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_split_of_any_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            cut in any::<prop::sample::Index>(),
        ) {
            let at = cut.index(data.len() + 1);
            let (x, y) = data.split_at(at);
            prop_assert_eq!(
                crc32c_combine(crc32c::crc32c(x), crc32c::crc32c(y), y.len()),
                crc32c::crc32c(&data)
            );
        }
    }
}
