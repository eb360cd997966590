//! One behavioural suite for every storage backend, generic over the `Storage` trait, plus what
//! only the local backend must do (temp files cleaned at start, symbolic links refused).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use cybernetic::config::Secret;
use cybernetic::domain::object_key::{ObjectKey, StoragePath};
use cybernetic::domain::tenant::TenantId;
use cybernetic::storage::local::LocalStorage;
use cybernetic::storage::memory::MemoryStorage;
use cybernetic::storage::s3::{MIN_PART_SIZE, S3Config, S3Storage};
use cybernetic::storage::{ByteStream, PutOptions, Storage, StorageError, body_from};

fn tenant(n: u128) -> TenantId {
    TenantId::from_uuid(uuid::Uuid::from_u128(n))
}

fn path(t: TenantId, key: &str) -> StoragePath {
    ObjectKey::parse(key).expect("valid key").under(t)
}

/// `total` bytes of a repeating pattern, in chunks of `chunk`.
fn pattern(total: usize) -> Vec<u8> {
    (0..total).map(|i| (i % 251) as u8).collect()
}

fn chunked(bytes: Vec<u8>, chunk: usize) -> ByteStream {
    let chunks: Vec<Result<Bytes, StorageError>> = bytes
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// A body that yields `good` bytes and then fails, as a client that goes away mid-upload.
fn cut_off(good: usize) -> ByteStream {
    let first: Result<Bytes, StorageError> = Ok(Bytes::from(pattern(good)));
    let then: Result<Bytes, StorageError> =
        Err(StorageError::Interrupted("the client went away".into()));
    Box::pin(futures::stream::iter(vec![first, then]))
}

async fn read_all(
    storage: &dyn Storage,
    p: &StoragePath,
    range: Option<std::ops::Range<u64>>,
) -> Vec<u8> {
    let got = storage.get(p, range).await.expect("get");
    let mut body = got.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(out.len() as u64, got.range.end - got.range.start);
    out
}

/// The upload directories under a local root's `.tmp/`.
fn upload_dirs(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(root.join(".tmp"))
        .expect("tmp")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect()
}

/// Temp files of uploads anywhere under a local root's `.tmp/`.
fn uploads_under(root: &std::path::Path) -> usize {
    let mut count = 0;
    let mut dirs = vec![root.join(".tmp")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("tmp") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "upload") {
                count += 1;
            }
        }
    }
    count
}

/// The paths of the first page (up to 100) listed under `prefix` after `after`.
async fn paths_listed(s: &dyn Storage, prefix: &StoragePath, after: Option<&str>) -> Vec<String> {
    s.list(prefix, after, 100)
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|l| l.path)
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn behaves(storage: Arc<dyn Storage>) {
    let s = storage.as_ref();
    let a = tenant(1);
    let report = path(a, "reports/2026/q3.csv");

    // Streamed put of several chunks, with its metadata.
    let data = pattern(3 * 1024 * 1024 + 17);
    let options = PutOptions {
        content_type: "text/csv".into(),
        metadata: BTreeMap::from([("owner".into(), "s3".into())]),
        tags: BTreeMap::from([("kind".into(), "report".into())]),
        if_absent: false,
    };
    let meta = s
        .put(&report, chunked(data.clone(), 64 * 1024), options)
        .await
        .expect("put");
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.sha256, Some(sha256_hex(&data)));
    assert_eq!(meta.path, report.as_str());
    let head = s.head(&report).await.expect("head");
    assert_eq!(
        (
            &head.path,
            head.size,
            &head.content_type,
            &head.metadata,
            &head.tags
        ),
        (
            &meta.path,
            meta.size,
            &meta.content_type,
            &meta.metadata,
            &meta.tags
        )
    );
    assert!(head.sha256.is_none() || head.sha256 == meta.sha256);
    assert_eq!(head.content_type, "text/csv");
    assert_eq!(head.metadata["owner"], "s3");
    assert_eq!(head.tags["kind"], "report");
    assert_eq!(read_all(s, &report, None).await, data);

    // Ranged reads, one of them across 1 MiB boundaries (a read unit of the local backend).
    assert_eq!(read_all(s, &report, Some(10..20)).await, data[10..20]);
    let mib = 1024 * 1024;
    assert_eq!(
        read_all(s, &report, Some(mib as u64 - 3..2 * mib as u64 + 5)).await,
        data[mib - 3..2 * mib + 5]
    );
    let len = data.len() as u64;
    assert_eq!(
        read_all(s, &report, Some(len - 5..len + 100)).await,
        data[data.len() - 5..]
    );
    assert!(matches!(
        s.get(&report, Some(len..len + 1)).await.err(),
        Some(StorageError::InvalidRange { size }) if size == len
    ));

    // Missing objects; deletes are idempotent.
    let missing = path(a, "nope");
    assert!(matches!(
        s.head(&missing).await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(
        s.get(&missing, None).await.err(),
        Some(StorageError::NotFound)
    ));
    s.delete(&missing).await.expect("deleting nothing succeeds");

    // Replacing, and refusing to replace.
    let small = path(a, "reports/small.txt");
    s.put(&small, body_from("one"), PutOptions::default())
        .await
        .expect("put");
    s.put(&small, body_from("two"), PutOptions::default())
        .await
        .expect("replace");
    assert_eq!(read_all(s, &small, None).await, b"two");
    let refused = s
        .put(
            &small,
            body_from("three"),
            PutOptions {
                if_absent: true,
                ..PutOptions::default()
            },
        )
        .await;
    assert!(matches!(refused, Err(StorageError::AlreadyExists)));
    assert_eq!(read_all(s, &small, None).await, b"two");
    let fresh = path(a, "reports/fresh.txt");
    s.put(
        &fresh,
        body_from("new"),
        PutOptions {
            if_absent: true,
            ..PutOptions::default()
        },
    )
    .await
    .expect("absent: stored");

    // An empty object.
    let empty = path(a, "empty");
    let meta = s
        .put(&empty, body_from(Bytes::new()), PutOptions::default())
        .await
        .expect("put");
    assert_eq!(meta.size, 0);
    assert_eq!(meta.sha256, Some(sha256_hex(b"")));
    assert_eq!(read_all(s, &empty, None).await, b"");

    // An object and objects under the same name as a prefix live side by side.
    let dir_like = path(a, "reports");
    s.put(&dir_like, body_from("x"), PutOptions::default())
        .await
        .expect("put");
    assert_eq!(read_all(s, &dir_like, None).await, b"x");

    // Interrupted uploads leave nothing, and do not disturb what was there.
    let cut = path(a, "reports/cut.bin");
    assert!(matches!(
        s.put(&cut, cut_off(100_000), PutOptions::default()).await,
        Err(StorageError::Interrupted(_))
    ));
    assert!(matches!(s.head(&cut).await, Err(StorageError::NotFound)));
    assert!(matches!(
        s.put(&small, cut_off(10), PutOptions::default()).await,
        Err(StorageError::Interrupted(_))
    ));
    assert_eq!(read_all(s, &small, None).await, b"two");

    // Listing: byte order, prefixes, pages.
    let b = tenant(2);
    s.put(
        &path(b, "reports/theirs.txt"),
        body_from("b"),
        PutOptions::default(),
    )
    .await
    .expect("put");
    let all = StoragePath::prefix(a, "").expect("prefix");
    let listed = s.list(&all, None, 100).await.expect("list");
    let paths: Vec<&str> = listed.items.iter().map(|m| m.path.as_str()).collect();
    let mut expected = vec![
        report.as_str(),
        small.as_str(),
        fresh.as_str(),
        empty.as_str(),
        dir_like.as_str(),
    ];
    expected.sort_unstable();
    assert_eq!(paths, expected, "only tenant a's objects, in byte order");
    assert_eq!(listed.next, None);
    let reports = StoragePath::prefix(a, "reports/").expect("prefix");
    let page = s.list(&reports, None, 2).await.expect("list");
    assert_eq!(page.items.len(), 2);
    let next = page.next.clone().expect("more");
    let rest = s.list(&reports, Some(&next), 2).await.expect("list");
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.next, None);
    let mut seen: Vec<String> = page
        .items
        .iter()
        .chain(&rest.items)
        .map(|m| m.path.clone())
        .collect();
    seen.dedup();
    assert_eq!(seen.len(), 3, "reports/: three objects, no repeats");
    let partial = StoragePath::prefix(a, "rep").expect("prefix");
    assert_eq!(
        s.list(&partial, None, 100).await.expect("list").items.len(),
        4
    );

    // Byte order across nesting: an object and objects under its name, names sorting just
    // before and after `/`; in pages of one, two and all, and from a point between objects.
    let c = tenant(3);
    let keys = ["a", "a/b", "a/b/c", "a-c", "a.d", "a0", "ab", "a/z", "b"];
    for (i, key) in keys.iter().enumerate() {
        s.put(
            &path(c, key),
            body_from(vec![b'x'; i + 1]),
            PutOptions::default(),
        )
        .await
        .expect("put");
    }
    let mut expected: Vec<String> = keys
        .iter()
        .map(|k| path(c, k).as_str().to_owned())
        .collect();
    expected.sort_unstable();
    let every = StoragePath::prefix(c, "").expect("prefix");
    for page_size in [1, 2, 100] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s
                .list(&every, after.as_deref(), page_size)
                .await
                .expect("list");
            assert!(page.items.len() <= page_size);
            seen.extend(page.items.iter().map(|l| l.path.clone()));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, expected, "pages of {page_size}");
    }
    let listed = s.list(&every, None, 100).await.expect("list");
    for item in &listed.items {
        let key = &item.path[every.as_str().len()..];
        let index = keys.iter().position(|k| *k == key).expect("a stored key");
        assert_eq!(item.size, index as u64 + 1, "the size of {key}");
    }
    let between = format!("{}a/", every.as_str());
    let rest = paths_listed(s, &every, Some(&between)).await;
    let later: Vec<String> = expected
        .iter()
        .filter(|p| p.as_str() > between.as_str())
        .cloned()
        .collect();
    assert_eq!(rest, later, "after a point that names no object");
    let under_a = StoragePath::prefix(c, "a/").expect("prefix");
    let nested = paths_listed(s, &under_a, None).await;
    assert_eq!(
        nested,
        ["a/b", "a/b/c", "a/z"].map(|k| path(c, k).as_str().to_owned())
    );

    // Deleting.
    s.delete(&small).await.expect("delete");
    assert!(matches!(s.head(&small).await, Err(StorageError::NotFound)));
    s.delete(&small).await.expect("again");
    assert_eq!(
        s.list(&reports, None, 100).await.expect("list").items.len(),
        2
    );
}

#[tokio::test]
async fn the_memory_backend_behaves() {
    behaves(Arc::new(MemoryStorage::new())).await;
}

#[tokio::test]
async fn the_local_backend_behaves() {
    let root = tempdir();
    behaves(Arc::new(LocalStorage::open(&root).await.expect("open"))).await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn the_local_backend_streams_an_object_past_its_write_and_read_ahead_steps() {
    // 40 MiB and a bit: ten write buffers (4 MiB each, up to four written at once) while it
    // arrives, the last one partial, and a read of it runs chunks ahead; odd-sized chunks in, so
    // no boundary lines up.
    let root = tempdir();
    let s = LocalStorage::open(&root).await.expect("open");
    let big = path(tenant(1), "exports/big.bin");
    let data = pattern(40 * 1024 * 1024 + 12_345);
    let meta = s
        .put(&big, chunked(data.clone(), 300_007), PutOptions::default())
        .await
        .expect("put");
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.sha256, Some(sha256_hex(&data)));
    assert!(read_all(&s, &big, None).await == data, "the whole object");
    let (from, to) = (17 * 1024 * 1024 - 1, 33 * 1024 * 1024 + 2);
    assert!(
        read_all(&s, &big, Some(from as u64..to as u64)).await == data[from..to],
        "a range across read units"
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cybernetic-storage-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn the_local_backend_cleans_unfinished_uploads_and_never_follows_links() {
    let root = tempdir();
    let storage = LocalStorage::open(&root).await.expect("open");
    let a = tenant(1);
    let kept = path(a, "kept.txt");
    storage
        .put(&kept, body_from("kept"), PutOptions::default())
        .await
        .expect("put");
    // What a crash mid-upload leaves behind, untouched for longer than any live upload is idle;
    // and a live upload of another process sharing the root, which is left alone.
    let stale = root.join(".tmp").join("deadbeef.upload");
    std::fs::write(&stale, b"partial").expect("write");
    let old = std::time::SystemTime::now() - cybernetic::storage::local::STALE_UPLOAD * 2;
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .and_then(|f| f.set_modified(old))
        .expect("age the file");
    let live = root.join(".tmp").join("cafe.upload");
    std::fs::write(&live, b"in progress").expect("write");
    // The upload directory of a process that is gone (nobody holds its lock), with an upload it
    // was writing a moment ago: removed at once, however fresh.
    let gone = root.join(".tmp").join("0123abcd");
    std::fs::create_dir(&gone).expect("mkdir");
    std::fs::write(gone.join("feed.upload"), b"cut off").expect("write");
    // The directory of the store still open here, with an upload in it: left alone.
    let open_dirs: Vec<_> = upload_dirs(&root);
    assert_eq!(
        open_dirs.len(),
        2,
        "the open store's directory and the planted one"
    );
    let mine = open_dirs
        .into_iter()
        .find(|d| *d != gone)
        .expect("the open store's directory");
    let in_progress = mine.join("beef.upload");
    std::fs::write(&in_progress, b"in progress").expect("write");
    let reopened = LocalStorage::open(&root).await.expect("reopen");
    assert!(!stale.exists(), "the stale upload is removed");
    assert!(live.exists(), "a fresh loose upload is left alone");
    assert!(!gone.exists(), "an abandoned upload directory is removed");
    assert!(
        in_progress.exists(),
        "an open store's uploads are left alone"
    );
    std::fs::remove_file(&live).expect("remove");
    assert_eq!(upload_dirs(&root).len(), 2, "one directory per open store");
    drop(storage);
    assert!(
        !mine.exists(),
        "a store removes its directory when it closes"
    );
    assert_eq!(read_all(&reopened, &kept, None).await, b"kept");

    // A link planted inside the tree, pointing outside it, is refused, not followed.
    // The planted file is a well-formed object file: only the refusal to follow links stops it.
    let outside = tempdir();
    let kept_file = root.join("objects").join(format!("{}\\", kept.as_str()));
    std::fs::copy(&kept_file, outside.join("secret\\")).expect("copy");
    let tenant_dir = kept_file.parent().expect("dir").to_path_buf();
    std::os::unix::fs::symlink(&outside, tenant_dir.join("escape")).expect("symlink");
    let through = path(a, "escape/secret");
    assert!(matches!(
        reopened.get(&through, None).await.err(),
        Some(StorageError::Backend(_))
    ));
    assert!(reopened.head(&through).await.is_err());
    assert!(
        reopened
            .put(&through, body_from("x"), PutOptions::default())
            .await
            .is_err()
    );
    assert!(reopened.delete(&through).await.is_err());
    // A link as the object's own file, pointing at a well-formed object file outside.
    std::os::unix::fs::symlink(outside.join("secret\\"), tenant_dir.join("linked\\"))
        .expect("symlink");
    let linked = path(a, "linked");
    assert!(matches!(
        reopened.get(&linked, None).await.err(),
        Some(StorageError::Backend(_))
    ));
    assert!(reopened.head(&linked).await.is_err());
    assert!(
        outside.join("secret\\").exists(),
        "nothing outside the root was deleted"
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&outside);
}

/// A fresh bucket on the local S3-compatible server the test setup runs (`moto_server`;
/// `TEST_S3_ENDPOINT`, default http://127.0.0.1:5000), with the smallest part size S3 allows so
/// multipart uploads are exercised with small objects.
async fn s3() -> (S3Storage, String) {
    let endpoint =
        std::env::var("TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned());
    let bucket = format!("cyb-test-{}", uuid::Uuid::new_v4().simple());
    let storage = S3Storage::new(&S3Config {
        bucket: bucket.clone(),
        endpoint: Some(endpoint),
        region: "us-east-1".to_owned(),
        force_path_style: true,
        access_key_id: Some(Secret::new("test")),
        secret_access_key: Some(Secret::new("test")),
        part_size: MIN_PART_SIZE,
        parts_in_flight: 2,
    })
    .await;
    storage
        .client()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create the test bucket (is moto_server running? scripts/test.sh starts it)");
    (storage, bucket)
}

async fn multipart_uploads_left(storage: &S3Storage, bucket: &str) -> usize {
    storage
        .client()
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("list uploads")
        .uploads()
        .len()
}

/// Begins a multipart upload at `key` with one part sent, as a process killed mid-upload leaves it.
async fn unfinished_upload(storage: &S3Storage, bucket: &str, key: &StoragePath) {
    let created = storage
        .client()
        .create_multipart_upload()
        .bucket(bucket)
        .key(key.as_str())
        .send()
        .await
        .expect("create an upload");
    storage
        .client()
        .upload_part()
        .bucket(bucket)
        .key(key.as_str())
        .upload_id(created.upload_id().expect("upload id"))
        .part_number(1)
        .body(aws_sdk_s3::primitives::ByteStream::from(pattern(1024)))
        .send()
        .await
        .expect("send a part");
}

/// Multipart uploads their process never finished nor aborted are aborted once begun before the
/// given time, below the given prefix only; the local and memory backends have none.
#[tokio::test]
async fn stale_multipart_uploads_are_aborted_below_the_prefix_only() {
    let (storage, bucket) = s3().await;
    let (a, b) = (tenant(1), tenant(2));
    unfinished_upload(&storage, &bucket, &path(a, "left/behind.bin")).await;
    unfinished_upload(&storage, &bucket, &path(b, "other.bin")).await;
    let prefix = StoragePath::prefix(a, "").expect("prefix");
    // moto reports every upload as begun on 2010-11-10 (a fixed date in its answer; S3 and MinIO
    // give the real time), so "begun since" is a time before that here.
    let long_before = chrono::DateTime::parse_from_rfc3339("2001-01-01T00:00:00Z")
        .expect("time")
        .to_utc();
    assert_eq!(
        storage
            .abort_stale_uploads(&prefix, long_before)
            .await
            .expect("sweep"),
        0,
        "an upload begun since is kept"
    );
    assert_eq!(multipart_uploads_left(&storage, &bucket).await, 2);
    let soon = chrono::Utc::now() + chrono::Duration::minutes(1);
    assert_eq!(
        storage
            .abort_stale_uploads(&prefix, soon)
            .await
            .expect("sweep"),
        1
    );
    let left = storage
        .client()
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .expect("list uploads");
    let keys: Vec<&str> = left.uploads().iter().filter_map(|u| u.key()).collect();
    assert_eq!(
        keys,
        vec![path(b, "other.bin").as_str()],
        "the other tenant's upload stays"
    );

    for other in [
        Arc::new(MemoryStorage::new()) as Arc<dyn Storage>,
        Arc::new(LocalStorage::open(tempdir()).await.expect("open")),
    ] {
        assert_eq!(
            other
                .abort_stale_uploads(&prefix, soon)
                .await
                .expect("sweep"),
            0
        );
    }
}

#[tokio::test]
async fn the_s3_backend_behaves() {
    behaves(Arc::new(s3().await.0)).await;
}

#[tokio::test]
async fn s3_uploads_large_objects_in_parts_and_leaves_no_parts_behind() {
    let (storage, bucket) = s3().await;
    let a = tenant(1);
    // Three parts: two of 5 MiB and the rest.
    let big = path(a, "exports/big.bin");
    let data = pattern(2 * MIN_PART_SIZE + 1_234_567);
    let meta = storage
        .put(
            &big,
            chunked(data.clone(), 256 * 1024),
            PutOptions {
                content_type: "application/octet-stream".into(),
                tags: BTreeMap::from([("kind".into(), "export".into())]),
                ..PutOptions::default()
            },
        )
        .await
        .expect("multipart put");
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.sha256, Some(sha256_hex(&data)));
    let head = storage.head(&big).await.expect("head");
    assert_eq!(head.size, data.len() as u64);
    assert_eq!(head.tags["kind"], "export");
    assert_eq!(read_all(&storage, &big, None).await, data);
    // A range across the first part boundary.
    let boundary = MIN_PART_SIZE as u64;
    assert_eq!(
        read_all(&storage, &big, Some(boundary - 10..boundary + 10)).await,
        data[MIN_PART_SIZE - 10..MIN_PART_SIZE + 10]
    );
    // Refusing to replace holds for multipart uploads too.
    let again = storage
        .put(
            &big,
            chunked(pattern(MIN_PART_SIZE + 1), 1 << 20),
            PutOptions {
                if_absent: true,
                ..PutOptions::default()
            },
        )
        .await;
    assert!(
        matches!(again, Err(StorageError::AlreadyExists)),
        "{again:?}"
    );
    assert_eq!(multipart_uploads_left(&storage, &bucket).await, 0);

    // A body that fails after two parts: the upload is aborted.
    let cut = path(a, "exports/cut.bin");
    let failed = storage
        .put(&cut, cut_off(2 * MIN_PART_SIZE + 10), PutOptions::default())
        .await;
    assert!(
        matches!(failed, Err(StorageError::Interrupted(_))),
        "{failed:?}"
    );
    assert!(matches!(
        storage.head(&cut).await,
        Err(StorageError::NotFound)
    ));
    assert_eq!(multipart_uploads_left(&storage, &bucket).await, 0);

    // A request cancelled mid-upload (its future dropped): the upload is aborted too.
    let (started, mut parts_sent) = tokio::sync::mpsc::unbounded_channel::<()>();
    let first = Bytes::from(pattern(MIN_PART_SIZE + 1));
    let hanging: ByteStream = Box::pin(
        futures::stream::iter(vec![Ok::<Bytes, StorageError>(first)]).chain(futures::stream::once(
            async move {
                let _ = started.send(());
                futures::future::pending::<Result<Bytes, StorageError>>().await
            },
        )),
    );
    let dropped = path(a, "exports/dropped.bin");
    let upload = {
        let storage = storage.clone();
        tokio::spawn(async move { storage.put(&dropped, hanging, PutOptions::default()).await })
    };
    parts_sent
        .recv()
        .await
        .expect("the body was read past its first part");
    crate::helpers::eventually(Duration::from_secs(10), "the upload under way", || async {
        multipart_uploads_left(&storage, &bucket).await == 1
    })
    .await;
    upload.abort();
    let _ = upload.await;
    crate::helpers::eventually(
        Duration::from_secs(10),
        "the cancelled upload aborted",
        || async { multipart_uploads_left(&storage, &bucket).await == 0 },
    )
    .await;
}

#[tokio::test]
async fn a_cancelled_upload_leaves_nothing_on_local_or_memory() {
    let root = tempdir();
    let local = LocalStorage::open(&root).await.expect("open");
    let backends: Vec<Arc<dyn Storage>> = vec![Arc::new(local), Arc::new(MemoryStorage::new())];
    for storage in backends {
        let (started, mut read) = tokio::sync::mpsc::unbounded_channel::<()>();
        let hanging: ByteStream = Box::pin(
            futures::stream::iter(vec![Ok::<Bytes, StorageError>(Bytes::from(pattern(
                100_000,
            )))])
            .chain(futures::stream::once(async move {
                let _ = started.send(());
                futures::future::pending::<Result<Bytes, StorageError>>().await
            })),
        );
        let p = path(tenant(1), "half/way.bin");
        let upload = {
            let storage = storage.clone();
            let p = p.clone();
            tokio::spawn(async move { storage.put(&p, hanging, PutOptions::default()).await })
        };
        read.recv().await.expect("the body was read");
        upload.abort();
        let _ = upload.await;
        assert!(matches!(
            storage.head(&p).await,
            Err(StorageError::NotFound)
        ));
        let all = StoragePath::prefix(tenant(1), "").expect("prefix");
        assert!(
            storage
                .list(&all, None, 10)
                .await
                .expect("list")
                .items
                .is_empty()
        );
    }
    assert_eq!(uploads_under(&root), 0, "no temp file is left behind");
    let _ = std::fs::remove_dir_all(&root);
}
