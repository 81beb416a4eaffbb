//! Deterministic stand-ins for real artifacts: an OS image and what a security update does to
//! it. The demo sends them to a car; the delta bench's smoke run measures them. The same
//! bytes every run, so what travels for them is the same every run too.

/// A stand-in OS image: compressible text-like bytes with some binary noise, deterministic.
pub fn image(len: usize) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"lib ",
        b"usr/share ",
        b"systemd\n",
        b"0x7f ELF ",
        b"config ",
        b"car\n",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(8) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x >> 32) as usize % words.len()]);
        }
    }
    out.truncate(len);
    out
}

/// What a security update does to an image: small rewrites in a few places, one file grown.
pub fn security_update(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    for k in 1..6 {
        let at = new.len() * k / 6;
        for b in &mut new[at..at + 2000] {
            *b = b.wrapping_add(3);
        }
    }
    let mid = new.len() / 2;
    new.splice(mid..mid, image(40_000).into_iter().rev());
    new
}
