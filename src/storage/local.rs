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
//! Speed: a put writes the body as it arrives, in buffers of [`STAGE`] bytes, with `O_DIRECT` where
//! the file system takes it, while another thread hashes it (see [`Writer`]): receiving, hashing
//! and the disk's time overlap, and the final fsync has nothing left to wait for but the disk's
//! own cache. A get reads
//! the file in order, one read at a time (so the kernel's readahead sees a sequential reader;
//! parallel reads of one file were less than half as fast from a cold cache here), up to
//! [`READ_AHEAD`] chunks ahead of what is being sent, and asks the kernel to bring the next
//! [`PREFETCH_WINDOW`] of the file into the page cache meanwhile (on Linux,
//! `posix_fadvise(WILLNEED)`), so the disk keeps reading while the socket sends.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
/// A get's read unit and an upload's hashing batch: each is one hop to tokio's blocking pool, so
/// larger is faster up to the pool's own buffer (2 MiB).
const CHUNK: usize = 1024 * 1024;
/// Body chunks hashed by one job at most: a client trickling tiny chunks makes small jobs, not a
/// long list of chunks held in memory.
const MAX_BATCH_CHUNKS: usize = 1024;
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
    /// What this store's uploads share (see [`Writer`]).
    writes: Arc<Writes>,
}

/// What a store's uploads share: the budget for their write buffers, and whether the file system
/// takes direct writes.
#[derive(Debug)]
struct Writes {
    /// One permit per write buffer allocated by an upload of this store ([`STORE_BUFFERS`]).
    buffers: Arc<tokio::sync::Semaphore>,
    /// Cleared for good by the first direct write the file system refuses: later uploads are not
    /// opened with `O_DIRECT`.
    direct: AtomicBool,
}

impl Default for Writes {
    fn default() -> Self {
        Self {
            buffers: Arc::new(tokio::sync::Semaphore::new(STORE_BUFFERS)),
            direct: AtomicBool::new(true),
        }
    }
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
            writes: Arc::default(),
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
        let direct = self.writes.direct.load(Ordering::Relaxed);
        let (file, direct) = create_upload(&temp, direct).await.map_err(|e| {
            // Not the object's absence: the store's own upload directory was removed under it.
            StorageError::Backend(format!(
                "cannot create an upload file in {}: {e}",
                self.uploads.dir.display()
            ))
        })?;
        // Removes the temp file if this future is dropped mid-upload (the client went away).
        let mut guard = RemoveOnDrop(Some(temp.clone()));
        let written = async {
            let mut writer = Writer::new(file, direct, self.writes.clone())?;
            while let Some(chunk) = body.next().await {
                writer.push(chunk?).await?;
            }
            let (hash, size) = writer.digest().await?;
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
            writer.seal(&trailer).await?;
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

/// Chunks of an upload's body gathered for one hashing job.
#[derive(Default)]
struct Batch {
    chunks: Vec<Bytes>,
    len: usize,
}

/// Streams an upload's body into its temp file, hashing it on the way.
///
/// The bytes are copied into an aligned [`Staging`] buffer as they arrive, and each full buffer is
/// written at its offset by a job on the blocking pool, up to [`MAX_WRITES`] at once, while the
/// body's chunks are hashed in batches by another job, one batch at a time: receiving, hashing and
/// the disk's time overlap instead of adding up. Every buffer after an upload's first takes a
/// permit from the store's budget ([`STORE_BUFFERS`]), never waiting for one: with the budget
/// spent, an upload reuses the buffer of its oldest write, one write at a time. So many uploads at
/// once bound the server's memory and blocking threads, and none is kept from starting.
///
/// A file opened with `O_DIRECT` is written by the disk's own DMA from those buffers, nothing going
/// through the page cache: that saves the copy into the cache and the kernel's writeback, and a
/// large upload does not evict what the cache holds for readers. The last part of the upload that
/// fills no whole block ([`DIRECT_ALIGN`]) is written through the page cache. A file system that
/// refuses a direct write (`EINVAL`: a logical block size above [`DIRECT_ALIGN`], say) gets that
/// write and every later one through the page cache, and the store opens no more uploads with
/// `O_DIRECT`; writes through the page cache start their writeback at once, so the final fsync
/// waits only for the tail.
struct Writer {
    file: Arc<std::fs::File>,
    /// Whether writes are direct: cleared for good by the first one refused.
    direct: Arc<AtomicBool>,
    store: Arc<Writes>,
    batch: Batch,
    /// The batch being hashed; it hands back the hash.
    hashing: Option<tokio::task::JoinHandle<Sha256>>,
    hash: Option<Sha256>,
    /// Bytes taken, trailer included.
    size: u64,
    /// The buffer being filled.
    current: Staging,
    /// Writes in flight, oldest first; each hands back its buffer.
    writes: VecDeque<tokio::task::JoinHandle<std::io::Result<Staging>>>,
    free: Vec<Staging>,
    /// Buffers made so far, at most `MAX_WRITES + 1`.
    made: usize,
    /// The most writes that were in flight at once (for the tests).
    #[cfg(test)]
    peak_writes: usize,
    /// Where the next full buffer goes in the file.
    queued: u64,
    /// A background `fdatasync` running, and how far the writes had been queued when it began.
    flushing: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    flushed: u64,
}

/// Staging buffers written at once per upload, at most.
const MAX_WRITES: usize = 4;
/// Staging buffers beyond each upload's first that a store's uploads hold at once, at most
/// (256 MiB).
const STORE_BUFFERS: usize = 64;
/// An upload asks the disk to make what has been written durable each time this much more has been
/// handed to writes, without waiting for it: a disk with a write cache (a VM's virtual disk above all)
/// then empties it while the upload goes on, and the final fsync finds little left to flush.
const FLUSH_STEP: u64 = 8 * 1024 * 1024;
/// A staging buffer's size: the unit of an upload's writes.
const STAGE: usize = 4 * 1024 * 1024;
/// What `O_DIRECT` asks a write's memory, offset and length to be multiples of: the logical block
/// size, at most 4096 on the disks this runs on (512-byte ones take 4096 too).
const DIRECT_ALIGN: usize = 4096;

impl Writer {
    fn new(file: std::fs::File, direct: bool, store: Arc<Writes>) -> Result<Self, StorageError> {
        if !direct {
            store.direct.store(false, Ordering::Relaxed);
        }
        let current = Staging::new(None)?;
        Ok(Self {
            file: Arc::new(file),
            direct: Arc::new(AtomicBool::new(direct)),
            store,
            batch: Batch::default(),
            hashing: None,
            hash: Some(Sha256::new()),
            size: 0,
            current,
            writes: VecDeque::new(),
            free: Vec::new(),
            made: 1,
            #[cfg(test)]
            peak_writes: 0,
            queued: 0,
            flushing: None,
            flushed: 0,
        })
    }

    /// Takes the next chunk of the body.
    async fn push(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.stage(&chunk).await?;
        self.batch.len += chunk.len();
        self.batch.chunks.push(chunk);
        if self.batch.len >= CHUNK || self.batch.chunks.len() >= MAX_BATCH_CHUNKS {
            self.hash_batch().await?;
        }
        Ok(())
    }

    /// Copies `bytes` into the staging buffers, writing each one that fills.
    async fn stage(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        self.size += bytes.len() as u64;
        while !bytes.is_empty() {
            let took = self.current.fill(bytes);
            bytes = &bytes[took..];
            if self.current.len() == STAGE {
                let full = std::mem::replace(&mut self.current, Staging::empty());
                self.send(full).await?;
                self.current = self.spare().await?;
            }
        }
        Ok(())
    }

    /// An empty buffer, called just after a full one was sent: a free one, a new one while fewer
    /// than `MAX_WRITES + 1` exist and the store's budget has a permit, or else the oldest
    /// write's once it is done (one is in flight).
    async fn spare(&mut self) -> Result<Staging, StorageError> {
        if let Some(free) = self.free.pop() {
            return Ok(free);
        }
        if self.made <= MAX_WRITES
            && let Ok(permit) = self.store.buffers.clone().try_acquire_owned()
        {
            self.made += 1;
            return Staging::new(Some(permit));
        }
        self.settle_oldest().await?;
        self.free.pop().ok_or_else(lost_state)
    }

    /// Starts writing `stage` at the next offset, once fewer than [`MAX_WRITES`] are in flight.
    async fn send(&mut self, stage: Staging) -> Result<(), StorageError> {
        if self.writes.len() >= MAX_WRITES {
            self.settle_oldest().await?;
        }
        let (file, direct, at) = (self.file.clone(), self.direct.clone(), self.queued);
        let store = self.store.clone();
        self.queued += stage.len() as u64;
        self.writes.push_back(tokio::task::spawn_blocking(move || {
            let written = write_stage(&file, &direct, stage, at);
            if !direct.load(Ordering::Relaxed) {
                store.direct.store(false, Ordering::Relaxed);
            }
            written
        }));
        #[cfg(test)]
        {
            self.peak_writes = self.peak_writes.max(self.writes.len());
        }
        if self.queued - self.flushed >= FLUSH_STEP
            && self.flushing.as_ref().is_none_or(|f| f.is_finished())
        {
            self.settle_flush().await?;
            let file = self.file.clone();
            self.flushed = self.queued;
            self.flushing = Some(tokio::task::spawn_blocking(move || file.sync_data()));
        }
        Ok(())
    }

    /// Waits for the background `fdatasync`, if one runs.
    async fn settle_flush(&mut self) -> Result<(), StorageError> {
        if let Some(flushing) = self.flushing.take() {
            flushing.await.map_err(stopped)??;
        }
        Ok(())
    }

    /// Waits for the oldest write in flight and keeps its buffer.
    async fn settle_oldest(&mut self) -> Result<(), StorageError> {
        if let Some(write) = self.writes.pop_front() {
            let stage = write.await.map_err(stopped)??;
            self.free.push(stage);
        }
        Ok(())
    }

    /// Starts hashing the gathered batch once the one before is hashed.
    async fn hash_batch(&mut self) -> Result<(), StorageError> {
        let batch = std::mem::take(&mut self.batch);
        if batch.len == 0 {
            return Ok(());
        }
        if let Some(hashing) = self.hashing.take() {
            self.hash = Some(hashing.await.map_err(stopped)?);
        }
        let mut hash = self.hash.take().ok_or_else(lost_state)?;
        self.hashing = Some(tokio::task::spawn_blocking(move || {
            for chunk in &batch.chunks {
                hash.update(chunk);
            }
            hash
        }));
        Ok(())
    }

    /// The hash of the whole body, and its size.
    async fn digest(&mut self) -> Result<(Sha256, u64), StorageError> {
        self.hash_batch().await?;
        if let Some(hashing) = self.hashing.take() {
            self.hash = Some(hashing.await.map_err(stopped)?);
        }
        Ok((self.hash.take().ok_or_else(lost_state)?, self.size))
    }

    /// Appends `trailer` (not hashed), writes what is left, waits for every write and makes the
    /// file durable.
    async fn seal(mut self, trailer: &[u8]) -> Result<(), StorageError> {
        self.stage(trailer).await?;
        while !self.writes.is_empty() {
            self.settle_oldest().await?;
        }
        // The last buffer, after every other write: its part short of a whole block goes through
        // the page cache, which takes O_DIRECT off the file.
        let (file, direct, at) = (self.file.clone(), self.direct.clone(), self.queued);
        let last = std::mem::replace(&mut self.current, Staging::empty());
        tokio::task::spawn_blocking(move || write_last(&file, &direct, last, at))
            .await
            .map_err(stopped)??;
        self.settle_flush().await?;
        let file = self.file;
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(stopped)??;
        Ok(())
    }
}

fn stopped(e: tokio::task::JoinError) -> StorageError {
    StorageError::Backend(format!("writing an object: {e}"))
}

/// The hash and the buffers are with the writer except while a job runs, and the writer takes
/// them back before it uses them again; if that were ever broken, the upload fails rather than
/// store a wrong checksum or a file with a hole.
fn lost_state() -> StorageError {
    StorageError::Backend("the upload's writer lost its state".into())
}

/// Writes a full buffer at `at`: directly while `direct` holds, else (or when the file system
/// refuses, which clears `direct`) through the page cache, starting its writeback.
fn write_stage(
    file: &std::fs::File,
    direct: &AtomicBool,
    mut stage: Staging,
    at: u64,
) -> std::io::Result<Staging> {
    use std::os::unix::fs::FileExt;
    if !(direct.load(Ordering::Relaxed) && write_direct(file, direct, stage.bytes(), at)?) {
        file.write_all_at(stage.bytes(), at)?;
        start_writeback(file, at, stage.len() as u64);
    }
    stage.clear();
    Ok(stage)
}

/// Writes `bytes` at `at` with `O_DIRECT` on; `false` if the file system refused it (`EINVAL`),
/// which turns `O_DIRECT` off for the file and clears `direct`. A partial direct write followed by
/// a refusal is written again whole by the caller.
fn write_direct(
    file: &std::fs::File,
    direct: &AtomicBool,
    bytes: &[u8],
    at: u64,
) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    match file.write_all_at(bytes, at) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(error = %e, "a direct write was refused; writing through the page cache");
            through_page_cache(file)?;
            direct.store(false, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Writes the upload's last, partial buffer at `at`: its whole blocks directly while `direct`
/// holds, and the rest through the page cache (a direct write must be whole blocks; padding it
/// and cutting the file back would make the file system read that block back from the disk).
fn write_last(
    file: &std::fs::File,
    direct: &AtomicBool,
    stage: Staging,
    at: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bytes = stage.bytes();
    let mut whole = bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    if whole > 0
        && !(direct.load(Ordering::Relaxed) && write_direct(file, direct, &bytes[..whole], at)?)
    {
        whole = 0;
    }
    if whole < bytes.len() {
        if direct.load(Ordering::Relaxed) {
            through_page_cache(file)?;
        }
        file.write_all_at(&bytes[whole..], at + whole as u64)?;
    }
    Ok(())
}

/// Up to [`STAGE`] bytes at an address aligned to [`DIRECT_ALIGN`]. The memory is reserved up front
/// and filled as bytes arrive (never zeroed beforehand, never moved).
struct Staging {
    mem: Vec<u8>,
    /// Where the aligned bytes start in `mem`.
    start: usize,
    /// The buffer's place in the store's budget, given back when it is dropped (an upload's
    /// first buffer has none: it is never kept waiting for one).
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Staging {
    fn new(permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Result<Self, StorageError> {
        let mut mem: Vec<u8> = Vec::with_capacity(STAGE + DIRECT_ALIGN);
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN {
            // align_offset may decline; it does not for a heap pointer to bytes.
            return Err(StorageError::Backend(
                "cannot align an upload buffer".into(),
            ));
        }
        mem.resize(start, 0);
        Ok(Self {
            mem,
            start,
            _permit: permit,
        })
    }

    /// A buffer one byte past the alignment, which a direct write refuses.
    #[cfg(test)]
    fn misaligned() -> Self {
        let mut stage = Self::new(None).expect("a buffer");
        stage.start += 1;
        stage.mem.resize(stage.start, 0);
        stage
    }

    /// A stand-in that holds nothing, for a writer done with its buffers.
    fn empty() -> Self {
        Self {
            mem: Vec::new(),
            start: 0,
            _permit: None,
        }
    }

    fn len(&self) -> usize {
        self.mem.len() - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.mem[self.start..]
    }

    /// Copies as much of `bytes` as fits (the capacity is never exceeded, so `mem` never moves);
    /// how much it took.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let took = bytes.len().min(STAGE - self.len());
        self.mem.extend_from_slice(&bytes[..took]);
        took
    }

    fn clear(&mut self) {
        self.mem.truncate(self.start);
    }
}

/// Creates an upload's temp file, on Linux with `O_DIRECT` where the file system takes it (the
/// flag says which).
async fn create_upload(path: &Path, direct: bool) -> std::io::Result<(std::fs::File, bool)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(target_os = "linux")]
        if direct {
            use std::os::unix::fs::OpenOptionsExt;
            match options.clone().custom_flags(libc::O_DIRECT).open(&path) {
                Ok(file) => return Ok((file, true)),
                // A file system without direct I/O: through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        options.open(&path).map(|file| (file, false))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Clears `O_DIRECT` on `file`: its writes go through the page cache from here on.
#[cfg(target_os = "linux")]
fn through_page_cache(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: the descriptor belongs to `file`, borrowed (so open) for both calls; F_GETFL and
    // F_SETFL read and set the descriptor's status flags and touch no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn through_page_cache(_file: &std::fs::File) -> std::io::Result<()> {
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

    /// Uneven chunks (empty ones too) over several staging buffers, then a trailer: the file
    /// holds exactly the bytes and the hash is theirs, with direct writes (several in flight),
    /// through the page cache, and with direct writes refused half-way; and with the end short of
    /// a whole block or right on one.
    #[tokio::test]
    async fn an_upload_is_written_exactly() {
        // Under the build's own directory: /tmp may be a tmpfs, which may refuse O_DIRECT.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let trailer = b"a trailer";
        for (mode, aligned_end) in [
            ("direct", false),
            ("direct", true),
            ("page cache", false),
            ("refused", false),
        ] {
            let mut chunks: Vec<Bytes> = (0..4000usize)
                .map(|i| Bytes::from(vec![(i % 253) as u8; (i * 7919) % 20_000]))
                .collect();
            let mut body: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            if aligned_end {
                let pad = (body.len() + trailer.len()).next_multiple_of(DIRECT_ALIGN)
                    - (body.len() + trailer.len());
                chunks.push(Bytes::from(vec![7u8; pad]));
                body.extend(std::iter::repeat_n(7u8, pad));
            }
            let mut expected = body.clone();
            expected.extend_from_slice(trailer);
            assert!(expected.len() > (MAX_WRITES + 2) * STAGE);
            assert_eq!(expected.len().is_multiple_of(DIRECT_ALIGN), aligned_end);

            let path = dir.join(format!("cyb-upload-{}", uuid::Uuid::new_v4()));
            let (file, direct) = create_upload(&path, mode != "page cache")
                .await
                .expect("create");
            assert_eq!(
                direct,
                mode != "page cache",
                "{mode}: the build's disk takes O_DIRECT"
            );
            let store = Arc::new(Writes::default());
            let mut writer = Writer::new(file, direct, store.clone()).expect("writer");
            if mode == "refused" {
                // A buffer one byte off the alignment: the first direct write is refused.
                writer.current = Staging::misaligned();
            }
            for chunk in &chunks {
                writer.push(chunk.clone()).await.expect("push");
            }
            let (hash, size) = writer.digest().await.expect("digest");
            assert_eq!(size, body.len() as u64);
            assert!(
                hash.finalize()[..] == Sha256::digest(&body)[..],
                "{mode}: the hash"
            );
            assert!(writer.made <= MAX_WRITES + 1);
            assert!(writer.peak_writes >= 2, "{mode}: writes overlap");
            let still_direct = writer.direct.load(Ordering::Relaxed);
            assert_eq!(
                still_direct,
                mode == "direct",
                "{mode}: direct writes kept or given up"
            );
            assert_eq!(
                store.direct.load(Ordering::Relaxed),
                mode != "refused" && mode != "page cache"
            );
            writer.seal(trailer).await.expect("seal");
            let back = std::fs::read(&path).expect("read back");
            let _ = std::fs::remove_file(&path);
            assert_eq!(back.len(), expected.len(), "{mode}: the length");
            assert!(back == expected, "{mode}: the bytes");
        }
    }

    /// Buffers beyond an upload's first come from the store's budget, never waited for: with it
    /// spent, an upload goes on with one buffer, one write at a time.
    #[tokio::test]
    async fn an_upload_with_the_store_budget_spent_still_completes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let path = dir.join(format!("cyb-upload-{}", uuid::Uuid::new_v4()));
        let (file, direct) = create_upload(&path, true).await.expect("create");
        let store = Arc::new(Writes::default());
        let held = store
            .buffers
            .clone()
            .try_acquire_many_owned(STORE_BUFFERS as u32)
            .expect("the whole budget");
        let mut writer = Writer::new(file, direct, store.clone()).expect("writer");
        let body = Bytes::from(vec![9u8; 3 * STAGE + 100]);
        writer.push(body.clone()).await.expect("push");
        let (_, size) = writer.digest().await.expect("digest");
        assert_eq!(size, body.len() as u64);
        assert_eq!(writer.made, 1);
        assert_eq!(writer.peak_writes, 1);
        writer.seal(b"").await.expect("seal");
        drop(held);
        assert_eq!(store.buffers.available_permits(), STORE_BUFFERS);
        let back = std::fs::read(&path).expect("read back");
        let _ = std::fs::remove_file(&path);
        assert!(back == body[..]);
    }
}
