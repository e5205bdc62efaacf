//! Writes bytes that `arbitrary` 1.x reads back as a chosen value, for committed seed corpora.
//!
//! The inverse of `arbitrary`'s format for the few shapes our inputs use: integers are
//! little-endian, `bool` is one byte (`& 1`), an enum is a `u32` tag mapped to a variant by
//! `(tag * variants) >> 32`, and the top-level `Vec` (read by `arbitrary_take_rest`) is a
//! `true` byte before each element. Tests decode every seed and compare, so a change in
//! `arbitrary`'s format shows up as a failing test, not as silently meaningless seeds.

/// Accumulates the encoded bytes.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// The bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// A `u8`.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    /// A `u16`, little-endian.
    pub fn u16(&mut self, v: u16) {
        self.0.extend(v.to_le_bytes());
    }

    /// A `u32`, little-endian.
    pub fn u32(&mut self, v: u32) {
        self.0.extend(v.to_le_bytes());
    }

    /// A `bool`.
    pub fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }

    /// Raw bytes of a fixed-size array.
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }

    /// The tag of variant `index` of an enum with `count` variants: the smallest `u32` that
    /// `(tag * count) >> 32` maps to `index`.
    pub fn variant(&mut self, index: u32, count: u32) {
        assert!(index < count);
        let tag = (u64::from(index) << 32).div_ceil(u64::from(count));
        self.u32(u32::try_from(tag).expect("index < count"));
    }

    /// Marks one more element of a trailing `Vec` read by `arbitrary_take_rest`.
    pub fn more(&mut self) {
        self.bool(true);
    }
}

/// A value that can be written in `arbitrary`'s format.
pub trait Encode {
    /// Appends `self`.
    fn encode(&self, w: &mut Writer);

    /// `self` alone, as bytes.
    fn to_seed(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode(&mut w);
        w.into_bytes()
    }
}

impl<T: Encode> Encode for [T] {
    /// A trailing `Vec`: only valid as the last field of the top-level input.
    fn encode(&self, w: &mut Writer) {
        for item in self {
            w.more();
            item.encode(w);
        }
    }
}

impl Encode for u8 {
    fn encode(&self, w: &mut Writer) {
        w.u8(*self);
    }
}

impl Encode for u16 {
    fn encode(&self, w: &mut Writer) {
        w.u16(*self);
    }
}

impl Encode for u32 {
    fn encode(&self, w: &mut Writer) {
        w.u32(*self);
    }
}

impl Encode for bool {
    fn encode(&self, w: &mut Writer) {
        w.bool(*self);
    }
}

impl<const N: usize> Encode for [u8; N] {
    fn encode(&self, w: &mut Writer) {
        w.bytes(self);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, w: &mut Writer) {
        w.bool(self.is_some());
        if let Some(v) = self {
            v.encode(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::{Arbitrary, Unstructured};

    #[derive(Arbitrary, Debug, PartialEq)]
    enum Five {
        A,
        B(u8),
        C,
        D(u16),
        E(bool),
    }

    #[test]
    fn variant_tags_decode_to_their_variant() {
        for count in 1..=40u32 {
            for index in 0..count {
                let mut w = Writer::default();
                w.variant(index, count);
                let tag = u32::from_le_bytes(w.into_bytes().try_into().unwrap());
                assert_eq!((u64::from(tag) * u64::from(count)) >> 32, u64::from(index));
            }
        }
        let mut w = Writer::default();
        w.variant(3, 5);
        w.u16(0xbeef);
        let bytes = w.into_bytes();
        assert_eq!(
            Five::arbitrary(&mut Unstructured::new(&bytes)).unwrap(),
            Five::D(0xbeef)
        );
    }
}
