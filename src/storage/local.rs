//! The local-filesystem backend.
//!
//! Layout under the root: `objects/<path>\` holds an object (the trailing `\`, a character keys
//! may not contain, keeps an object `a` and the objects under `a/` apart), and `.tmp/` holds
//! uploads in progress, each open store's in a directory of its own. An object's file is its
//! bytes followed by a trailer: its metadata as JSON, the JSON's length (8 bytes, little-endian)
//! and the magic `CYBOBJ\0\x01`.
//!
//! A put streams the body into a new file in its store's directory under `.tmp/` (constant
//! memory, hashing as it goes), writes
//! the trailer, fsyncs the file, renames it into place (or links it, when it must not replace an
//! object) and fsyncs the directory (and the ones above it, when the put created directories or
//! found ones that another put created and has not fsynced yet):
//! readers see the old object or the whole new one, never a part, and a crash leaves at most a
//! temp file, which the next [`LocalStorage::open`] on the root removes (in this process or any
//! other).
//! Symbolic links are never followed: a path through one is refused.
//!
//! Speed: while a body arrives, the disk is asked to start writing what has been received every
//! [`WRITEBACK_STEP`] (on Linux, `sync_file_range`), so receiving and writing overlap and the final
//! fsync waits only for the tail, not for the whole object sitting in the page cache. A get reads
//! the file in order, one read at a time (so the kernel's readahead sees a sequential reader;
//! parallel reads of one file were less than half as fast from a cold cache here), up to
//! [`READ_AHEAD`] chunks ahead of what is being sent, and asks the kernel to bring the next
//! [`PREFETCH_WINDOW`] of the file into the page cache meanwhile (on Linux,
//! `posix_fadvise(WILLNEED)`), so the disk keeps reading while the socket sends.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::fs::{self, File};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    ByteStream, FileSpan, GetResult, ListPage, Listed, ObjectMeta, PutOptions, Storage,
    StorageError, StoragePath, fit_range,
};

const MAGIC: &[u8; 8] = b"CYBOBJ\x00\x01";
const TRAILER_FIXED: u64 = 16;
/// Metadata beyond this is not a trailer this backend wrote.
const MAX_TRAILER_JSON: u64 = 1 << 20;
const OBJECT_SUFFIX: char = '\\';
/// Read and write unit: each is one hop to tokio's blocking pool, so larger is faster up to the
/// pool's own buffer (2 MiB).
const CHUNK: usize = 1024 * 1024;
/// Body chunks written by one call at most (`IOV_MAX`): a client trickling tiny chunks makes
/// small writes, not a long list of chunks held in memory.
const MAX_BATCH_CHUNKS: usize = 1024;
/// An upload starts the writeback of what it received each time this much more has arrived.
const WRITEBACK_STEP: u64 = 16 * 1024 * 1024;
/// Chunks a get holds ready ahead of the one being sent.
const READ_AHEAD: usize = 2;
/// How far ahead of a get's reads the kernel is asked to bring the file in (on Linux,
/// `posix_fadvise(WILLNEED)`), renewed each time the reads have moved this window's quarter on:
/// the disk keeps reading while the reader waits for the client, instead of only when a read
/// finds the page cache empty.
const PREFETCH_WINDOW: u64 = 64 * 1024 * 1024;
/// A loose temp file (directly in `.tmp/`, as builds before per-process upload directories left
/// them) not written to for this long belongs to an upload that will never finish.
pub const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(15 * 60);

#[derive(Debug, Clone)]
pub struct LocalStorage {
    objects: PathBuf,
    uploads: Arc<Uploads>,
    /// Directories a put of this process created whose entries may not be on disk yet (marked
    /// before they are created, cleared once the directories above them were fsynced). A put
    /// that finds its directory already there, but made by a put still in progress, fsyncs the
    /// directories above as well: otherwise it could answer before the entry that leads to its
    /// object is durable.
    unsynced: Arc<Mutex<Marks>>,
}

/// Directories marked as maybe not durable, each with the number of its marking, so a put clears
/// only the marks it has seen made durable, never one set again since.
#[derive(Debug, Default)]
struct Marks {
    dirs: HashMap<PathBuf, u64>,
    next: u64,
}

impl Marks {
    fn mark(&mut self, dir: &Path) {
        self.next += 1;
        self.dirs.insert(dir.to_path_buf(), self.next);
    }

    /// The marks on `dir` and the directories above it.
    fn above(&self, dir: &Path) -> Vec<(PathBuf, u64)> {
        dir.ancestors()
            .filter_map(|d| self.dirs.get(d).map(|&n| (d.to_path_buf(), n)))
            .collect()
    }
}

/// This process's directory for uploads in progress, `.tmp/<random>/`, locked (`flock`) for as
/// long as the store is open. The kernel lets the lock go when the process ends, however it ends,
/// so an unlocked directory is one whose process is gone: its temp files are uploads that will
/// never finish. Removed, with what is in it, when the store is dropped.
#[derive(Debug)]
struct Uploads {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl Drop for Uploads {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Takes the exclusive lock of a directory, waiting for it (`wait`) or not: `None` while another
/// holder (an open store of this process or another) has it.
fn lock(dir: &Path, wait: bool) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(dir)?;
    let how = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: the descriptor belongs to `file`, open for the whole call; flock only reads it.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        return Ok(Some(file));
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        e => Err(e),
    }
}

/// `Ok` for what is already gone: another store starting at the same time removed it first.
fn unless_gone<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes what uploads of processes that are gone left in `tmp`: every directory no open store
/// holds, and loose files untouched for [`STALE_UPLOAD`]. Returns how many entries it removed.
/// Runs under the lock of `tmp` itself, as does making a store's own directory, so a sweep never
/// sees a new store's directory before that store holds it.
fn sweep_uploads(tmp: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(tmp)? {
        let entry = entry?;
        let Some(kind) = unless_gone(entry.file_type())? else {
            continue;
        };
        if kind.is_dir() {
            // Holding the lock while removing: a store starting meanwhile cannot take it over.
            if let Some(Some(_held)) = unless_gone(lock(&entry.path(), false))? {
                unless_gone(std::fs::remove_dir_all(entry.path()))?;
                removed += 1;
            }
            continue;
        }
        let Some(meta) = unless_gone(entry.metadata())? else {
            continue;
        };
        let idle = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if idle >= STALE_UPLOAD {
            unless_gone(std::fs::remove_file(entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl LocalStorage {
    /// Opens the store at `root` (creating it), and removes what uploads cut off by a crash left
    /// in its temp directory (see [`Uploads`]): the uploads in progress of another process sharing
    /// the root (a `serve` and a `worker` on one volume) are left be.
    pub async fn open(root: impl AsRef<Path>) -> Result<Self, StorageError> {
        let root = root.as_ref();
        fs::create_dir_all(root).await?;
        let root = fs::canonicalize(root).await?;
        let objects = root.join("objects");
        let tmp = root.join(".tmp");
        fs::create_dir_all(&objects).await?;
        fs::create_dir_all(&tmp).await?;
        let uploads = tokio::task::spawn_blocking(move || {
            // Stores opening the same root at once take turns here (for a moment).
            let _turn = lock(&tmp, true)?;
            let removed = sweep_uploads(&tmp)?;
            if removed > 0 {
                tracing::info!(removed, "removed uploads left unfinished by an earlier run");
            }
            let dir = tmp.join(uuid::Uuid::new_v4().simple().to_string());
            std::fs::create_dir(&dir)?;
            let held = lock(&dir, false)?.ok_or_else(|| {
                std::io::Error::other("a new upload directory is locked by someone else")
            })?;
            Ok::<_, std::io::Error>(Uploads { dir, _lock: held })
        })
        .await
        .map_err(|e| StorageError::Backend(format!("opening the store failed: {e}")))??;
        Ok(Self {
            objects,
            uploads: Arc::new(uploads),
            unsynced: Arc::default(),
        })
    }

    fn unsynced(&self) -> MutexGuard<'_, Marks> {
        // A map of paths; a panic elsewhere cannot leave it half-updated.
        self.unsynced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The directories from `dir` up that do not exist yet, below the objects root.
    async fn missing_dirs(&self, dir: &Path) -> Vec<PathBuf> {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(d) = at.filter(|d| d.starts_with(&self.objects) && *d != self.objects) {
            if fs::symlink_metadata(d).await.is_ok() {
                break;
            }
            missing.push(d.to_path_buf());
            at = d.parent();
        }
        missing
    }

    fn file(&self, path: &StoragePath) -> PathBuf {
        let mut name = OsString::from(path.as_str());
        name.push(OBJECT_SUFFIX.to_string());
        self.objects.join(name)
    }

    /// Refuses a path that passes through a symbolic link below the objects directory.
    async fn no_links(&self, path: &Path) -> Result<(), StorageError> {
        let Ok(below) = path.strip_prefix(&self.objects) else {
            return Err(StorageError::Backend(
                "path outside the storage root".into(),
            ));
        };
        let mut at = self.objects.clone();
        for part in below.components() {
            at.push(part);
            match fs::symlink_metadata(&at).await {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StorageError::Backend(format!(
                        "refusing to follow a symbolic link at {}",
                        at.display()
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn open_object(&self, path: &StoragePath) -> Result<(File, ObjectMeta), StorageError> {
        let file = self.file(path);
        static NO_OPENAT2: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        let opened = if NO_OPENAT2.load(std::sync::atomic::Ordering::Relaxed) {
            Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
        } else {
            let (objects, below) = (self.objects.clone(), file.clone());
            tokio::task::spawn_blocking(move || open_beneath(&objects, &below))
                .await
                .map_err(|e| StorageError::Backend(format!("opening an object: {e}")))?
        };
        let f = match opened {
            Ok(f) => f,
            // A kernel without openat2 (before Linux 5.6), or a seccomp filter refusing it: each
            // component is checked, then the object is opened without following a link in its
            // last one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                NO_OPENAT2.store(true, std::sync::atomic::Ordering::Relaxed);
                self.no_links(&file).await?;
                nofollow_open(&file).await?
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(StorageError::Backend(format!(
                    "refusing to follow a symbolic link on the way to {}",
                    file.display()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let mut f = File::from_std(f);
        let meta = read_trailer(&mut f).await?;
        Ok((f, meta))
    }

    async fn write_temp(
        &self,
        path: &StoragePath,
        mut body: ByteStream,
        options: PutOptions,
    ) -> Result<(PathBuf, ObjectMeta), StorageError> {
        let temp = self
            .uploads
            .dir
            .join(format!("{}.upload", uuid::Uuid::new_v4().simple()));
        let file = File::create(&temp).await.map_err(|e| {
            // Not the object's absence: the store's own upload directory was removed under it.
            StorageError::Backend(format!(
                "cannot create an upload file in {}: {e}",
                self.uploads.dir.display()
            ))
        })?;
        // Removes the temp file if this future is dropped mid-upload (the client went away).
        let mut guard = RemoveOnDrop(Some(temp.clone()));
        let written = async {
            let mut writer = Writer::new(Arc::new(file.into_std().await));
            let mut batch = Batch::default();
            while let Some(chunk) = body.next().await {
                batch.push(chunk?);
                if batch.len >= CHUNK || batch.chunks.len() >= MAX_BATCH_CHUNKS {
                    writer.write(std::mem::take(&mut batch)).await?;
                }
            }
            writer.write(batch).await?;
            let (file, hash, size) = writer.finish().await?;
            let meta = ObjectMeta {
                path: path.as_str().to_owned(),
                size,
                content_type: options.content_type,
                metadata: options.metadata,
                tags: options.tags,
                sha256: Some(hex::encode(hash.finalize())),
                modified_at: Utc::now(),
            };
            let json =
                serde_json::to_vec(&meta).map_err(|e| StorageError::Backend(e.to_string()))?;
            let mut trailer = json;
            trailer.extend_from_slice(&(trailer.len() as u64).to_le_bytes());
            trailer.extend_from_slice(MAGIC);
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut out: &std::fs::File = &file;
                out.write_all(&trailer)?;
                file.sync_all()
            })
            .await
            .map_err(|e| StorageError::Backend(format!("writing an object: {e}")))??;
            Ok::<_, StorageError>(meta)
        }
        .await;
        guard.0 = None;
        match written {
            Ok(meta) => Ok((temp, meta)),
            Err(e) => {
                let _ = fs::remove_file(&temp).await;
                Err(e)
            }
        }
    }

    /// Moves a finished temp file into place; with `if_absent`, only where nothing is.
    async fn publish(
        &self,
        temp: &Path,
        target: &Path,
        if_absent: bool,
    ) -> Result<(), StorageError> {
        let parent = target
            .parent()
            .ok_or_else(|| StorageError::Backend("object path has no parent".into()))?;
        // A concurrent delete may remove an emptied directory between creating and renaming.
        let mut created = false;
        'attempts: for attempt in 0..3 {
            // One level at a time from the top, each marked before it is made, so this put knows
            // exactly which directories it made (a delete may remove an emptied one meanwhile).
            for dir in self.missing_dirs(parent).await.into_iter().rev() {
                self.unsynced().mark(&dir);
                match fs::create_dir(&dir).await {
                    Ok(()) => created = true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 2 => {
                        continue 'attempts;
                    }
                    Err(e) => {
                        return Err(StorageError::Backend(format!(
                            "cannot create {}: {e} (is a prefix of this key an object's name?)",
                            dir.display()
                        )));
                    }
                }
            }
            self.no_links(target).await?;
            let moved = if if_absent {
                match fs::hard_link(temp, target).await {
                    Ok(()) => fs::remove_file(temp).await,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(StorageError::AlreadyExists);
                    }
                    Err(e) => Err(e),
                }
            } else {
                fs::rename(temp, target).await
            };
            match moved {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 2 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // Marks on the way up, taken after this put's own directories were made and before any
        // directory is fsynced: a directory marked here existed before its parent's fsync below.
        let marks = self.unsynced().above(parent);
        // Not the object's absence: its directory went between the move and here (a delete).
        let dir = File::open(parent)
            .await
            .map_err(|e| StorageError::Backend(format!("cannot open {}: {e}", parent.display())))?;
        dir.sync_all().await?;
        if created || !marks.is_empty() {
            // New directories' own entries must be durable too, or a crash could take the object
            // with them: fsync each directory above the object's, up to the objects root.
            let mut dir = parent.parent();
            while let Some(d) = dir.filter(|d| d.starts_with(&self.objects)) {
                File::open(d).await?.sync_all().await?;
                dir = d.parent();
            }
            // Durable now, unless marked again since (made anew after a delete removed them).
            // Marks of a put that failed before here are cleared by the next put below them.
            let mut unsynced = self.unsynced();
            for (dir, mark) in marks {
                if unsynced.dirs.get(&dir) == Some(&mark) {
                    unsynced.dirs.remove(&dir);
                }
            }
        }
        Ok(())
    }

    /// Removes the directories a delete emptied, up to the objects root.
    async fn prune_dirs(&self, file: &Path) {
        let mut dir = file.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.objects || !d.starts_with(&self.objects) {
                break;
            }
            if fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }

    /// Up to `want` object paths under `dir` that start with `prefix` and sort after `after`, in
    /// byte order. Directories are read one at a time, smallest name first, and only those that
    /// can hold such a path: a page costs the directories on its way, not the whole tree.
    ///
    /// Depth first with one stack gives byte order because an entry's key is its object path
    /// (a file) or its path and a `/` (a directory): siblings' keys are never prefixes of one
    /// another except a file's of a directory's of the same name, and a file has nothing under
    /// it, so everything under a key sorts between it and the next sibling's.
    async fn walk(
        &self,
        dir: PathBuf,
        prefix: &str,
        after: Option<&str>,
        want: usize,
    ) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        // (key, directory to read): popped smallest key first.
        let mut stack: Vec<(String, Option<PathBuf>)> = vec![(String::new(), Some(dir))];
        while let Some((key, dir)) = stack.pop() {
            let Some(dir) = dir else {
                out.push(key);
                if out.len() >= want {
                    break;
                }
                continue;
            };
            let mut entries = match fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let mut children = Vec::new();
            while let Some(entry) = entries.next_entry().await? {
                let kind = entry.file_type().await?;
                let path = entry.path();
                let Some(rel) = path
                    .strip_prefix(&self.objects)
                    .ok()
                    .and_then(|rel| rel.to_str())
                else {
                    continue;
                };
                if kind.is_dir() {
                    let key = format!("{rel}/");
                    // Something under `key` can start with the prefix and sort after `after`.
                    let in_prefix = key.starts_with(prefix) || prefix.starts_with(&key);
                    let past = after.is_none_or(|a| key.as_str() > a || a.starts_with(&key));
                    if in_prefix && past {
                        children.push((key, Some(path)));
                    }
                } else if kind.is_file()
                    && let Some(object) = rel.strip_suffix(OBJECT_SUFFIX)
                    && object.starts_with(prefix)
                    && after.is_none_or(|a| object > a)
                {
                    children.push((object.to_owned(), None));
                }
            }
            children.sort_unstable_by(|a, b| b.0.cmp(&a.0));
            stack.extend(children);
        }
        Ok(out)
    }
}

/// Asks the kernel to start writing `len` bytes of `file` from `from` to the disk, without waiting
/// for it: the final fsync then has only the rest to wait for. An optimisation only; a failure
/// here surfaces at that fsync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor belongs to `file`, which is borrowed (so open) for the whole call;
    // sync_file_range only reads its arguments and touches no memory of ours.
    let done =
        unsafe { libc::sync_file_range(file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
    if done != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range failed");
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _from: u64, _len: u64) {}

/// Asks the kernel to start reading `range` of `file` into the page cache, without waiting for
/// it. An optimisation only: a failure is logged and the reads go on without it.
#[cfg(target_os = "linux")]
fn prefetch(file: &std::fs::File, range: Range<u64>) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (
        i64::try_from(range.start),
        i64::try_from(range.end - range.start),
    ) else {
        return;
    };
    // SAFETY: the descriptor belongs to `file`, which is borrowed (so open) for the whole call;
    // posix_fadvise only reads its arguments and touches no memory of ours.
    let failed =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), from, len, libc::POSIX_FADV_WILLNEED) };
    if failed != 0 {
        tracing::debug!(error = %std::io::Error::from_raw_os_error(failed), "posix_fadvise failed");
    }
}

#[cfg(not(target_os = "linux"))]
fn prefetch(_file: &std::fs::File, _range: Range<u64>) {}

/// Reads `start..end` of `file` in order, chunk by chunk, up to [`READ_AHEAD`] chunks ahead of
/// the receiver. The reader waits (holding no thread) while the receiver is slow, and stops when
/// the receiver is dropped.
fn read_in_order(
    file: Arc<std::fs::File>,
    start: u64,
    end: u64,
) -> tokio::sync::mpsc::Receiver<Result<Bytes, StorageError>> {
    let (chunks, ready) = tokio::sync::mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        let mut prefetch = Prefetch::new(start..end);
        let mut at = start;
        while at < end {
            let len = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let ahead = prefetch.next(at);
            let chunk = read_chunk(file.clone(), at, len, ahead).await;
            let failed = chunk.is_err();
            if chunks.send(chunk).await.is_err() || failed {
                return;
            }
            at += len as u64;
        }
    });
    ready
}

/// When a sequential reader of a range asks the kernel to bring the file in ahead of it: up to
/// [`PREFETCH_WINDOW`] past the read position, renewed each time that has moved a quarter of the
/// window on (never for a range of one chunk or less).
struct Prefetch {
    end: u64,
    /// How far the kernel was asked to bring the file in so far.
    asked: u64,
}

impl Prefetch {
    fn new(range: Range<u64>) -> Self {
        let asked = if range.end - range.start > CHUNK as u64 {
            range.start
        } else {
            range.end
        };
        Self {
            end: range.end,
            asked,
        }
    }

    /// The part of the file to ask for now that the reader is at `at`, if any.
    fn next(&mut self, at: u64) -> Option<Range<u64>> {
        let want = (at + PREFETCH_WINDOW).min(self.end);
        let due =
            (want == self.end && self.asked < self.end) || want >= self.asked + PREFETCH_WINDOW / 4;
        due.then(|| std::mem::replace(&mut self.asked, want)..want)
    }
}

/// `len` bytes of `file` from `at`, read on the blocking pool, after asking for `ahead` to be
/// brought in.
async fn read_chunk(
    file: Arc<std::fs::File>,
    at: u64,
    len: usize,
    ahead: Option<Range<u64>>,
) -> Result<Bytes, StorageError> {
    tokio::task::spawn_blocking(move || {
        if let Some(ahead) = ahead {
            prefetch(&file, ahead);
        }
        Ok(Bytes::from(read_exact_at(&file, at, len)?))
    })
    .await
    .map_err(|e| StorageError::Backend(format!("reading an object: {e}")))?
}

/// `len` bytes of `file` from `at`, read into a buffer that is not zeroed first (zeroing a 1 MiB
/// buffer per chunk was a twentieth of a GET's CPU).
fn read_exact_at(file: &std::fs::File, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let offset = libc::off_t::try_from(at + buf.len() as u64)
            .map_err(|_| std::io::Error::other("read offset out of range"))?;
        let wanted = len - buf.len();
        // The capacity may exceed `len`: never read past what was asked.
        let spare = &mut buf.spare_capacity_mut()[..wanted];
        // SAFETY: the descriptor belongs to `file`, open for the whole call; pread writes at most
        // `spare.len()` bytes into the vector's unused capacity, which `spare` covers.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                spare.len(),
                offset,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // SAFETY: pread initialised the `n` bytes after the current length (n <= spare).
            n => unsafe { buf.set_len(buf.len() + n as usize) },
        }
    }
    Ok(buf)
}

/// Opens `path` (below `root`) for reading in one step that follows no symbolic link on the way
/// and cannot leave `root` (`openat2` with `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`): a link
/// swapped in after a check could not redirect it, as it could a check followed by an open.
/// `ENOSYS` where the kernel lacks `openat2`, `ELOOP` for a link on the way.
#[cfg(target_os = "linux")]
fn open_beneath(root: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;

    let below = path
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other("path outside the storage root"))?;
    let below = CString::new(below.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
    // The root itself may be reached through a link (the objects directory of a root an operator
    // linked elsewhere); only the path below it is resolved without links.
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)?;
    /// The kernel's `struct open_how` (linux/openat2.h).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH,
    };
    // SAFETY: the directory descriptor is open for the call, `below` is a NUL-terminated string
    // that outlives it, and `how` is a valid open_how whose size is passed with it. The kernel
    // reads these and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            below.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd =
        libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("descriptor out of range"))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(not(target_os = "linux"))]
fn open_beneath(_root: &Path, _path: &Path) -> std::io::Result<std::fs::File> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Opens `path` for reading, refusing a symbolic link as its last component.
async fn nofollow_open(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Chunks of an upload's body gathered for one write.
#[derive(Default)]
struct Batch {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Batch {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }
}

/// Hashes and writes an upload's body batch by batch on the blocking pool, one batch at a time,
/// while the next batch arrives: the bytes go from the body's buffers straight into the file, with
/// no copy in between, and the hashing leaves the runtime's threads. Every [`WRITEBACK_STEP`] it
/// starts the writeback of what it wrote.
struct Writer {
    file: Arc<std::fs::File>,
    /// The batch being written; it hands back the hash and the size so far.
    running: Option<tokio::task::JoinHandle<std::io::Result<(Sha256, u64)>>>,
    hash: Option<Sha256>,
    size: u64,
    /// What the writeback was started for so far.
    handed: u64,
}

impl Writer {
    fn new(file: Arc<std::fs::File>) -> Self {
        Self {
            file,
            running: None,
            hash: Some(Sha256::new()),
            size: 0,
            handed: 0,
        }
    }

    /// Waits for the batch being written.
    async fn settle(&mut self) -> Result<(), StorageError> {
        if let Some(running) = self.running.take() {
            let (hash, size) = running
                .await
                .map_err(|e| StorageError::Backend(format!("writing an object: {e}")))??;
            self.hash = Some(hash);
            self.size = size;
        }
        Ok(())
    }

    /// Starts writing `batch` once the one before is written.
    async fn write(&mut self, batch: Batch) -> Result<(), StorageError> {
        if batch.len == 0 {
            return Ok(());
        }
        self.settle().await?;
        let mut hash = self.hash.take().ok_or_else(lost_hash)?;
        let (file, mut size) = (self.file.clone(), self.size);
        let from = self.handed;
        let start_writeback_now = size + batch.len as u64 - from >= WRITEBACK_STEP;
        if start_writeback_now {
            self.handed = size + batch.len as u64;
        }
        self.running = Some(tokio::task::spawn_blocking(move || {
            for chunk in &batch.chunks {
                hash.update(chunk);
            }
            write_chunks(&file, &batch.chunks)?;
            size += batch.len as u64;
            if start_writeback_now {
                start_writeback(&file, from, size - from);
            }
            Ok((hash, size))
        }));
        Ok(())
    }

    /// Waits for the last batch: the file, the hash of everything written and its size.
    async fn finish(mut self) -> Result<(Arc<std::fs::File>, Sha256, u64), StorageError> {
        self.settle().await?;
        let hash = self.hash.ok_or_else(lost_hash)?;
        Ok((self.file, hash, self.size))
    }
}

/// The hash is with the writer except while a batch runs, and [`Writer::settle`] takes it back
/// before anything else uses it; if that were ever broken, the upload fails rather than store a
/// wrong checksum.
fn lost_hash() -> StorageError {
    StorageError::Backend("the upload's hash was lost".into())
}

/// Writes every chunk, in order, with as few calls as the kernel allows.
fn write_chunks(file: &std::fs::File, chunks: &[Bytes]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut out = file;
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(MAX_BATCH_CHUNKS);
        match out.write_vectored(&rest[..take]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes an upload's temp file when the upload is abandoned half-way.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // One unlink: cheap enough to do in place.
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn read_trailer(f: &mut File) -> Result<ObjectMeta, StorageError> {
    let corrupt = || StorageError::Backend("object file has no valid trailer".into());
    let len = f.metadata().await?.len();
    if len < TRAILER_FIXED {
        return Err(corrupt());
    }
    f.seek(SeekFrom::Start(len - TRAILER_FIXED)).await?;
    let mut fixed = [0u8; 16];
    f.read_exact(&mut fixed).await?;
    if &fixed[8..] != MAGIC {
        return Err(corrupt());
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&fixed[..8]);
    let json_len = u64::from_le_bytes(n);
    if json_len > MAX_TRAILER_JSON || json_len + TRAILER_FIXED > len {
        return Err(corrupt());
    }
    f.seek(SeekFrom::Start(len - TRAILER_FIXED - json_len))
        .await?;
    let mut json = vec![0u8; json_len as usize];
    f.read_exact(&mut json).await?;
    let meta: ObjectMeta = serde_json::from_slice(&json).map_err(|_| corrupt())?;
    if meta.size != len - TRAILER_FIXED - json_len {
        return Err(corrupt());
    }
    Ok(meta)
}

impl Storage for LocalStorage {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn put<'a>(
        &'a self,
        path: &'a StoragePath,
        body: ByteStream,
        options: PutOptions,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            let target = self.file(path);
            if options.if_absent && fs::symlink_metadata(&target).await.is_ok() {
                return Err(StorageError::AlreadyExists);
            }
            let if_absent = options.if_absent;
            let (temp, meta) = self.write_temp(path, body, options).await?;
            if let Err(e) = self.publish(&temp, &target, if_absent).await {
                let _ = fs::remove_file(&temp).await;
                return Err(e);
            }
            Ok(meta)
        })
    }

    fn get<'a>(
        &'a self,
        path: &'a StoragePath,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<GetResult, StorageError>> {
        Box::pin(async move {
            let (f, meta) = self.open_object(path).await?;
            let range = fit_range(range, meta.size)?;
            // An object's file never changes once in place (a replacement is a new file renamed
            // over it), so positional reads of this handle see one version throughout.
            let file = Arc::new(f.into_std().await);
            let span = FileSpan {
                file: file.clone(),
                range: range.clone(),
                sent: None,
            };
            // The reader starts when the body is first polled: a sender that takes the file span
            // instead reads nothing twice.
            let (start, end) = (range.start, range.end);
            let body = futures::stream::once(async move { read_in_order(file, start, end) })
                .flat_map(|ready| {
                    futures::stream::unfold(ready, |mut ready| async move {
                        ready.recv().await.map(|chunk| (chunk, ready))
                    })
                });
            Ok(GetResult {
                meta,
                range,
                body: Box::pin(body),
                file: Some(span),
            })
        })
    }

    fn head<'a>(
        &'a self,
        path: &'a StoragePath,
    ) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move { self.open_object(path).await.map(|(_, meta)| meta) })
    }

    fn delete<'a>(&'a self, path: &'a StoragePath) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let file = self.file(path);
            self.no_links(&file).await?;
            match fs::remove_file(&file).await {
                Ok(()) => {
                    if let Some(parent) = file.parent() {
                        File::open(parent).await?.sync_all().await?;
                    }
                    self.prune_dirs(&file).await;
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a StoragePath,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>> {
        Box::pin(async move {
            // Walk from the deepest directory the prefix names whole.
            let dir = match prefix.as_str().rfind('/') {
                Some(i) => self.objects.join(&prefix.as_str()[..i]),
                None => self.objects.clone(),
            };
            self.no_links(&dir).await?;
            let mut paths = self
                .walk(dir, prefix.as_str(), after, limit.saturating_add(1))
                .await?;
            let more = paths.len() > limit;
            paths.truncate(limit);
            let mut items = Vec::with_capacity(paths.len());
            for path in &paths {
                match self.head(&StoragePath::raw(path)).await {
                    Ok(meta) => items.push(Listed::from(&meta)),
                    // Deleted since the walk.
                    Err(StorageError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(ListPage {
                next: more.then(|| paths.last().cloned()).flatten(),
                items,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_written_whole_and_in_order() {
        let path = std::env::temp_dir().join(format!("cyb-chunks-{}", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).expect("create");
        // More chunks than one call takes, of uneven sizes (empty ones too).
        let chunks: Vec<Bytes> = (0..3000usize)
            .map(|i| Bytes::from(vec![(i % 251) as u8; (i * 37) % 700]))
            .collect();
        write_chunks(&file, &chunks).expect("write");
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(std::fs::read(&path).expect("read back"), expected);
        let _ = std::fs::remove_file(&path);
    }
}
