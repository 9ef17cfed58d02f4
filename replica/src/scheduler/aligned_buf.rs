//! A heap buffer whose start address and capacity are multiples of 4096 bytes.
//!
//! `O_DIRECT` I/O requires the buffer address, the file offset and the length to be
//! aligned to the device's logical block size; a `Vec<u8>` only guarantees an
//! alignment of 1. [`AlignedBuf`] is the one buffer type the scheduler accepts for
//! reads and writes, so every request it hands to the kernel is `O_DIRECT`-safe
//! without a bounce copy. The length may be any value up to the capacity (a short
//! read at end of file truncates it); the capacity is always rounded up to
//! [`BUF_ALIGN`].

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// Alignment (and capacity granularity) of every [`AlignedBuf`], in bytes: the largest
/// logical block size of the disks Tessera runs on, and its block size.
pub const BUF_ALIGN: usize = 4096;

/// Largest buffer the scheduler allocates. A single kernel read/write transfers at most
/// about 2 GiB, and the data-plane protocol caps requests far below that; the limit turns
/// an absurd length into an error instead of an allocation failure.
pub const MAX_BUF_LEN: usize = 1 << 30;

/// Why a buffer could not be created.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AlignedBufError {
    /// The requested length exceeds [`MAX_BUF_LEN`].
    #[error("buffer of {len} bytes exceeds the limit of {MAX_BUF_LEN} bytes")]
    TooLarge {
        /// Requested length.
        len: usize,
    },
}

/// An owned, zero-initialised, 4096-byte aligned byte buffer.
///
/// Why not `Vec<u8>`: `O_DIRECT` needs aligned memory, and an in-flight io_uring
/// operation needs memory whose address never changes while the kernel holds it; an
/// `AlignedBuf` never reallocates (it has no `push`), so moving the value moves only the
/// pointer, not the bytes.
pub struct AlignedBuf {
    /// Start of the allocation; valid for `cap` bytes, all initialised.
    ptr: NonNull<u8>,
    /// Bytes in use, `len <= cap`.
    len: usize,
    /// Allocated bytes, a non-zero multiple of [`BUF_ALIGN`].
    cap: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); nothing else
// holds the pointer, so sending it to another thread transfers sole ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes (`as_slice`), which is
// safe from several threads at once, as for `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zero-filled buffer of `len` bytes (capacity rounded up to
    /// [`BUF_ALIGN`]). Zeroed so a buffer handed to a read that comes back short never
    /// exposes stale heap contents.
    pub fn zeroed(len: usize) -> Result<Self, AlignedBufError> {
        if len > MAX_BUF_LEN {
            return Err(AlignedBufError::TooLarge { len });
        }
        let cap = len.div_ceil(BUF_ALIGN).max(1) * BUF_ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (`cap >= BUF_ALIGN`), the only
        // requirement of `alloc_zeroed`.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Ok(Self { ptr, len, cap })
    }

    /// Allocates a buffer holding a copy of `data`; the way to hand caller bytes to an
    /// `O_DIRECT` write.
    pub fn from_slice(data: &[u8]) -> Result<Self, AlignedBufError> {
        let mut buf = Self::zeroed(data.len())?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf)
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, BUF_ALIGN)
            .expect("cap <= MAX_BUF_LEN + BUF_ALIGN fits isize and BUF_ALIGN is a power of two")
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes; [`Self::set_len`] can grow the buffer up to this.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the number of bytes in use, at most the capacity (clamped), so one buffer can
    /// be reused for requests of different sizes. Bytes beyond the old length keep
    /// whatever they held (zero or earlier data), never uninitialised memory.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised bytes (zeroed at
        // allocation) and uniquely owned; the shared borrow of `self` prevents mutation
        // for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes in use, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the exclusive borrow of `self` makes this the only
        // reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw start pointer, for building io_uring entries. The memory stays valid (and at
    /// the same address) until the buffer is dropped.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable start pointer, for io_uring reads; see [`Self::as_ptr`].
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies the bytes in use into a `Vec`, for callers that do not do direct I/O.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly `Self::layout(self.cap)`
        // (cap never changes after allocation) and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096] {
            let buf = AlignedBuf::zeroed(len).expect("small buffer");
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.capacity() % BUF_ALIGN, 0);
            assert!(buf.capacity() >= len.max(1));
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn from_slice_copies_and_set_len_clamps() {
        let mut buf = AlignedBuf::from_slice(b"hello").expect("small buffer");
        assert_eq!(buf.as_slice(), b"hello");
        buf.set_len(2);
        assert_eq!(buf.as_slice(), b"he");
        buf.set_len(usize::MAX);
        assert_eq!(buf.len(), BUF_ALIGN);
        assert_eq!(&buf.as_slice()[..5], b"hello");
    }

    #[test]
    fn too_large_is_an_error() {
        assert_eq!(
            AlignedBuf::zeroed(MAX_BUF_LEN + 1).err(),
            Some(AlignedBufError::TooLarge {
                len: MAX_BUF_LEN + 1
            })
        );
    }
}
