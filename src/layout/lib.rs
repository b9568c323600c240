//! The on-disk records of RAFS images (v5 bootstraps, v6 bootstraps, which are EROFS images) and of Nydus
//! data blobs (chunk-info array, ToC, tar headers), each defined **once**: a [`record!`] table names every
//! field with its type and byte offset, and generates the struct, its size, one reader and one writer. The
//! daemon's parsers, the image builder and the in-guest helper all go through these definitions, so a field
//! moved here moves for all of them.
//!
//! Integers are little-endian. Readers take any slice at least [`Record::SIZE`] bytes long and never panic;
//! validating what the fields *mean* is the parser's job, not this crate's.

pub mod blob;
pub mod erofs;
pub mod v5;

/// A value stored at a fixed offset of a record.
pub trait Field: Copy {
    const SIZE: usize;
    /// Reads the value at `at`; the caller guarantees `b.len() >= at + SIZE`.
    fn get(b: &[u8], at: usize) -> Self;
    /// Writes the value at `at`; the caller guarantees `b.len() >= at + SIZE`.
    fn put(self, b: &mut [u8], at: usize);
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(b: &[u8], at: usize) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(&b[at..at + Self::SIZE]);
                <$t>::from_le_bytes(raw)
            }
            fn put(self, b: &mut [u8], at: usize) {
                b[at..at + Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
int_field!(u8, u16, u32, u64);

impl<const N: usize> Field for [u8; N] {
    const SIZE: usize = N;
    fn get(b: &[u8], at: usize) -> Self {
        let mut raw = [0u8; N];
        raw.copy_from_slice(&b[at..at + N]);
        raw
    }
    fn put(self, b: &mut [u8], at: usize) {
        b[at..at + N].copy_from_slice(&self);
    }
}

/// A fixed-size on-disk record.
pub trait Record: Sized {
    /// Bytes the record occupies on disk (fields not named are reserved and written as zeros).
    const SIZE: usize;
    /// The record at the start of `b`, or `None` when `b` is shorter than [`Record::SIZE`].
    fn read(b: &[u8]) -> Option<Self>;
    /// Writes every named field into the first [`Record::SIZE`] bytes of `b`; other bytes are left alone.
    ///
    /// # Panics
    /// When `b` is shorter than [`Record::SIZE`] (a writer's own buffer, sized by the writer).
    fn write_to(&self, b: &mut [u8]);
    /// The record on its own, reserved bytes zero.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; Self::SIZE];
        self.write_to(&mut out);
        out
    }
}

/// Declares an on-disk record: `record! { /// doc  pub struct Name(SIZE) { field: type @ offset, ... } }`.
/// Generates the struct (all fields public, `Default` = all zeros), [`Record`] with one reader and one
/// writer from the same table, and compile-time checks that every field lies inside the record.
#[macro_export]
macro_rules! record {
    ($(#[$meta:meta])* pub struct $name:ident ($size:expr) {
        $($(#[$fmeta:meta])* $field:ident : $ty:ty = $off:expr),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $($field: <$ty as $crate::Field>::get(&[0u8; $size], 0),)* }
            }
        }

        impl $crate::Record for $name {
            const SIZE: usize = $size;
            fn read(b: &[u8]) -> Option<Self> {
                let b = b.get(..$size)?;
                Some($name { $($field: <$ty as $crate::Field>::get(b, $off),)* })
            }
            fn write_to(&self, b: &mut [u8]) {
                let b = &mut b[..$size];
                $($crate::Field::put(self.$field, b, $off);)*
            }
        }

        // A field that sticks out of its record fails the build, not a test.
        #[allow(clippy::int_plus_one)]
        const _: () = {
            $(assert!($off + <$ty as $crate::Field>::SIZE <= $size, "field outside its record");)*
        };
    };
}

/// The bytes of a NUL-padded name field (blob ids, ToC and tar names) up to the first NUL.
pub fn padded(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A NUL-padded name field holding `name`; `None` when the name does not fit.
pub fn pad<const N: usize>(name: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    out.get_mut(..name.len())?.copy_from_slice(name);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    record! {
        /// A record for the macro's own test: fields out of order, a gap, an array.
        pub struct Sample(32) {
            b: u64 = 8,
            a: u16 = 0,
            tag: [u8; 4] = 4,
            c: u32 = 28,
        }
    }

    #[test]
    fn fields_land_at_their_offsets_and_read_back() {
        let s = Sample {
            a: 0x0102,
            tag: *b"wxyz",
            b: 0x1122_3344_5566_7788,
            c: 0xAABB_CCDD,
        };
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[0..2], &[0x02, 0x01]);
        assert_eq!(&bytes[4..8], b"wxyz");
        assert_eq!(&bytes[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[16..28], &[0; 12], "unnamed bytes stay zero");
        assert_eq!(&bytes[28..32], &0xAABB_CCDDu32.to_le_bytes());
        assert_eq!(Sample::read(&bytes), Some(s));
        assert_eq!(
            Sample::read(&bytes[..31]),
            None,
            "short input is refused, not a panic"
        );
        assert_eq!(Sample::default(), Sample::read(&[0; 32]).unwrap());
    }

    #[test]
    fn names_pad_and_unpad() {
        let f: [u8; 8] = pad(b"abc").unwrap();
        assert_eq!(&f, b"abc\0\0\0\0\0");
        assert_eq!(padded(&f), b"abc");
        assert_eq!(padded(b"full"), b"full");
        assert!(pad::<2>(b"abc").is_none());
    }
}
