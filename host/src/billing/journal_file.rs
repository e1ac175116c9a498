//! The journal's file, mapped into memory: an append is a copy into the
//! page cache instead of a `write(2)`. It survives the process dying the
//! same way (the pages are the kernel's, written back like any others), but
//! costs no system call and keeps the journal's lock for a copy only.
//!
//! The file's space is allocated ahead of its contents (`fallocate`), so a
//! copy never meets a full disk — through a mapping that would be a
//! `SIGBUS`, not an error. When an append does not fit, the file is enlarged
//! first, and a full disk is then that append's error. What follows the
//! contents is zeros, which [`contents`] leaves out.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{Ordering, compiler_fence};

use memmap2::{MmapMut, UncheckedAdvice};

/// Space a new file is given; the journal between two of the writer's
/// commits (50 ms of rows by default) fits in it at tens of thousands of
/// requests per second.
const INITIAL_CAPACITY: usize = 1 << 20;

/// Bytes zeroed at a time by [`MappedFile::clear`].
const CLEAR_STEP: usize = 4096;

/// Bytes of an emptied file whose pages stay mapped in this process for
/// the next lines; pages past it (a burst's) are let go, and stay in the
/// page cache.
const WARM_BYTES: usize = 512 << 10;

/// `data` without the zeros after its last byte.
pub fn contents(data: &[u8]) -> &[u8] {
    &data[..data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)]
}

/// An append-only file of lines, mapped.
pub struct MappedFile {
    file: File,
    map: MmapMut,
    len: usize,
}

impl MappedFile {
    /// Open `path`, creating it if needed, to append after its last complete
    /// line (a cut line after it is zeroed: it was never acknowledged).
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        let mut file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
        // Read, not scanned through the mapping: that would bring every
        // page of it into this process's memory.
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let end = contents(&data).len();
        let len = data[..end].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        file.write_all_at(&vec![0; end - len], len as u64)?;
        reserve(&file, data.len().max(INITIAL_CAPACITY))?;
        let map = map(&file)?;
        Ok(Self { file, map, len })
    }

    /// Bytes of lines in the file.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Copy `line` after the contents, enlarging the file first when it
    /// does not fit (the only step that can fail).
    pub fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let end = self.len.checked_add(line.len()).ok_or_else(|| io::Error::other("journal too large"))?;
        if end > self.map.len() {
            let capacity = end.max(self.map.len().saturating_mul(2));
            reserve(&self.file, capacity)?;
            self.map = map(&self.file)?;
        }
        self.map[self.len..end].copy_from_slice(line);
        self.len = end;
        Ok(())
    }

    /// Empty the file; its space stays allocated for the next lines. It is
    /// zeroed from the end backwards, so a process that dies part way
    /// leaves whole lines and one cut line: read back, that is a torn last
    /// line, and the whole lines are already committed.
    pub fn clear(&mut self) {
        let mut end = self.len;
        while end > 0 {
            let start = end.saturating_sub(CLEAR_STEP);
            self.map[start..end].fill(0);
            // Keep the steps in this order (no merging into one forward fill).
            compiler_fence(Ordering::SeqCst);
            end = start;
        }
        if self.len > WARM_BYTES {
            // SAFETY: the mapping is shared and of a file: `MADV_DONTNEED`
            // only unmaps the pages from this process; their contents (the
            // zeros just written) stay in the page cache and read back as
            // they are.
            #[allow(unsafe_code)]
            let _ = unsafe {
                self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, WARM_BYTES, self.len - WARM_BYTES)
            };
        }
        self.len = 0;
    }
}

/// Allocate the first `capacity` bytes of `file` (extending it), so that
/// writes through a mapping never need space the disk may not have.
fn reserve(file: &File, capacity: usize) -> io::Result<()> {
    let len = u64::try_from(capacity).map_err(io::Error::other)?;
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        // A filesystem without `fallocate`: write the zeros instead.
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            use std::os::unix::fs::FileExt;
            let mut at = file.metadata()?.len();
            let zeros = vec![0u8; 1 << 16];
            while at < len {
                let n = usize::try_from((len - at).min(zeros.len() as u64)).map_err(io::Error::other)?;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn map(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the mapping is only valid while nothing truncates the file
    // under it. The file is the gateway's own, in its private data
    // directory (mode 0700); the journal only ever enlarges it, and never
    // renames, replaces or deletes it while it is mapped.
    #[allow(unsafe_code)]
    unsafe {
        MmapMut::map_mut(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_grow_the_file_and_clear_leaves_it_allocated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let mut f = MappedFile::open(&path).expect("open");
        f.append(b"one\n").expect("append");
        let big = vec![b'x'; INITIAL_CAPACITY + 10];
        f.append(&big).expect("an append larger than the file enlarges it");
        f.append(b"\n").expect("append");
        let data = std::fs::read(&path).expect("read");
        assert_eq!(contents(&data).len(), f.len());
        assert!(contents(&data).starts_with(b"one\nxxx"));
        f.clear();
        assert_eq!(f.len(), 0);
        let data = std::fs::read(&path).expect("read");
        assert!(contents(&data).is_empty());
        assert!(data.len() > INITIAL_CAPACITY, "the space stays allocated");
    }

    #[test]
    fn reopening_appends_after_the_last_whole_line_and_drops_a_cut_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        // A file as `write(2)` left it: no zeros after the contents.
        std::fs::write(&path, b"a\nb\ncu").expect("write");
        let mut f = MappedFile::open(&path).expect("open");
        assert_eq!(f.len(), 4);
        f.append(b"c\n").expect("append");
        drop(f);
        assert_eq!(contents(&std::fs::read(&path).expect("read")), b"a\nb\nc\n");
    }
}
