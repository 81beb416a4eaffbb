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

/// A stand-in shared library: machine-code-like bytes (4-byte instructions: an opcode from a
/// small set, a register byte, a 16-bit address), deterministic. Compresses about 4:1 on its own.
pub fn library(len: usize) -> Vec<u8> {
    const OPCODES: [u8; 8] = [0x48, 0x8b, 0x89, CALL, 0x0f, 0x83, 0xc3, 0x31];
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut addr: u16 = 0;
    let mut out = Vec::with_capacity(len + 4);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        addr = addr.wrapping_add(((x >> 16) & 31) as u16);
        out.push(OPCODES[(x & 7) as usize]);
        out.push(((x >> 8) & 3) as u8);
        out.extend_from_slice(&addr.to_le_bytes());
    }
    out.truncate(len);
    out
}

const CALL: u8 = 0xe8;

/// What rebuilding a library does to it: every call target moves (code was inserted somewhere)
/// and one register in every twelve instructions changes, so no stretch of a few hundred bytes is
/// left as it was. Every chunk of it changes; its old version is still the best reference.
pub fn rebuild(library: &mut [u8]) {
    for (k, at) in (0..library.len().saturating_sub(3)).step_by(4).enumerate() {
        if k % 12 == 0 {
            library[at + 1] ^= 1;
        }
        if library[at] == CALL {
            let target = u16::from_le_bytes([library[at + 2], library[at + 3]]).wrapping_add(7);
            library[at + 2..at + 4].copy_from_slice(&target.to_le_bytes());
        }
    }
}
