//! Triton's system shared-memory extension: a client registers a POSIX shared-memory object
//! (`shm_open`'s namespace, `/dev/shm` on Linux) as a named region, then passes input and
//! output tensors through it instead of in the request (parameters `shared_memory_region`,
//! `shared_memory_byte_size`, `shared_memory_offset`). Off unless the server is started with
//! `--allow-client-shm`, as in Triton: a registered region lets a client have the server read
//! and write a shared-memory object it names.
//!
//! The object is not mapped: tensor bytes are read with `pread` and written with `pwrite` on
//! its descriptor (`FileExt::read_exact_at`, `write_all_at`). A client may truncate its object
//! at any moment; touching a mapping past the new end would kill the server with SIGBUS, while
//! a short `pread` is only an error, which the request gets as FAILED_PRECONDITION naming the
//! region. The object is opened with `O_NOFOLLOW` and must be a regular file, so a key cannot
//! lead the server through a symbolic link or to a device or FIFO in `/dev/shm`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use tonic::Status;
use veraltheim_proto::inference::InferParameter;
use veraltheim_proto::inference::infer_parameter::ParameterChoice;

use crate::params::unsigned_param;

/// Where POSIX shared-memory objects live.
const SHM_DIR: &str = "/dev/shm";

/// Why no CUDA shared-memory region can be registered.
const CUDA_UNSUPPORTED: &str = "CUDA shared memory is not supported by this server (GPUs \
     not supported for shared memory: it maps no GPU memory of another process)";

/// One registered region: `byte_size` bytes of the object `key`, from `offset`.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
    /// The object, read and written at offsets (`pread`/`pwrite`), never mapped.
    file: File,
}

/// The registered regions.
pub struct SharedMemory {
    allowed: bool,
    regions: RwLock<HashMap<String, Arc<Region>>>,
}

/// Where a tensor's data lies: a slice of a registered region.
#[derive(Clone, Debug, PartialEq)]
pub struct ShmRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl SharedMemory {
    pub fn new(allowed: bool) -> Self {
        SharedMemory {
            allowed,
            regions: RwLock::new(HashMap::new()),
        }
    }

    pub fn allowed(&self) -> bool {
        self.allowed
    }

    fn check_allowed(&self) -> Result<(), Status> {
        if self.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "client shared memory is disabled on this server; start it with --allow-client-shm, or send tensor data in the request",
            ))
        }
    }

    /// Maps `byte_size` bytes of the shared-memory object `key` from `offset` as region `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), Status> {
        self.check_allowed()?;
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "a shared-memory region needs a name",
            ));
        }
        if byte_size == 0 {
            return Err(Status::invalid_argument(format!(
                "shared-memory region '{name}': byte_size must be above 0"
            )));
        }
        let path = object_path(key).map_err(|why| {
            Status::invalid_argument(format!("shared-memory region '{name}': {why}"))
        })?;
        let mut regions = self.regions.write();
        if regions.contains_key(name) {
            return Err(Status::already_exists(format!(
                "shared-memory region '{name}' is already registered; unregister it first"
            )));
        }
        let object = format!("the object '{key}' ({})", path.display());
        let bad =
            |why: String| Status::invalid_argument(format!("shared-memory region '{name}': {why}"));
        // O_NOFOLLOW: a symbolic link planted in /dev/shm must not make the server open a file
        // elsewhere. O_NONBLOCK: opening a FIFO must not hang the handler (it is refused below).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| bad(format!("cannot open {object}: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| bad(format!("cannot examine {object}: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(bad(format!("{object} is not a regular file")));
        }
        let len = meta.len();
        let end = offset.saturating_add(byte_size);
        if end > len {
            return Err(Status::invalid_argument(format!(
                "shared-memory region '{name}': offset {offset} + byte_size {byte_size} is past the end of '{key}' ({len} bytes)"
            )));
        }
        regions.insert(
            name.to_string(),
            Arc::new(Region {
                name: name.to_string(),
                key: key.to_string(),
                offset,
                byte_size,
                file,
            }),
        );
        Ok(())
    }

    /// Forgets region `name` (every region when it is empty). Unknown names are not an error,
    /// so that a client may clean up unconditionally.
    pub fn unregister(&self, name: &str) -> Result<(), Status> {
        self.check_allowed()?;
        let mut regions = self.regions.write();
        if name.is_empty() {
            regions.clear();
        } else {
            regions.remove(name);
        }
        Ok(())
    }

    /// Region `name`, or all of them when it is empty.
    pub fn status(&self, name: &str) -> Result<Vec<Arc<Region>>, Status> {
        self.check_allowed()?;
        let regions = self.regions.read();
        if name.is_empty() {
            let mut all: Vec<_> = regions.values().cloned().collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(all);
        }
        regions
            .get(name)
            .map(|r| vec![r.clone()])
            .ok_or_else(|| unknown(name))
    }

    /// CUDA shared memory, answered as Triton answers it where it has no GPU support: no
    /// region is ever registered, so the status of all of them is an empty list, the status of
    /// one is NOT_FOUND, and unregistering (all, or any name) is OK, so that a client that
    /// cleans up first (Triton's examples do) goes on. Registering is refused by
    /// [`SharedMemory::cuda_register`]. Open whether or not `--allow-client-shm` is given: it
    /// touches nothing.
    pub fn cuda_status(&self, name: &str) -> Result<(), Status> {
        if name.is_empty() {
            return Ok(());
        }
        if self.regions.read().contains_key(name) {
            return Err(Status::not_found(format!(
                "shared-memory region '{name}' is system shared memory, not CUDA shared memory"
            )));
        }
        Err(Status::not_found(format!(
            "no CUDA shared-memory region '{name}' is registered (this server registers none: \
             {CUDA_UNSUPPORTED})"
        )))
    }

    /// Unregistering CUDA shared memory: there is none, so nothing to do (see
    /// [`SharedMemory::cuda_status`]).
    pub fn cuda_unregister(&self, _name: &str) -> Result<(), Status> {
        Ok(())
    }

    /// Registering CUDA shared memory: refused, INVALID_ARGUMENT as Triton refuses it without
    /// GPU support, saying why and what to use instead.
    pub fn cuda_register(&self, name: &str) -> Result<(), Status> {
        Err(Status::invalid_argument(format!(
            "failed to register CUDA shared-memory region '{name}': {CUDA_UNSUPPORTED}; use \
             system shared memory (--allow-client-shm) or send tensor data in the request"
        )))
    }

    fn region(&self, r: &ShmRef) -> Result<Arc<Region>, Status> {
        self.check_allowed()?;
        self.regions
            .read()
            .get(&r.region)
            .cloned()
            .ok_or_else(|| unknown(&r.region))
    }

    /// Checks that `r` lies inside a registered region.
    pub fn check(&self, what: &str, r: &ShmRef) -> Result<(), Status> {
        let region = self.region(r)?;
        bounds(what, &region, r).map(|_| ())
    }

    /// Copies the bytes `r` names out of its region (one `pread`). An object that its owner
    /// truncated yields FAILED_PRECONDITION, however late the truncation came.
    pub fn read(&self, what: &str, r: &ShmRef) -> Result<Bytes, Status> {
        let region = self.region(r)?;
        let (start, len) = bounds(what, &region, r)?;
        let mut out = vec![0u8; len];
        region
            .file
            .read_exact_at(&mut out, region.offset + start)
            .map_err(|e| access_failed(what, &region, r, "read", &e))?;
        Ok(Bytes::from(out))
    }

    /// Copies `data` into the place `r` names (one `pwrite`); `data` may be shorter than
    /// `r.byte_size`.
    pub fn write(&self, what: &str, r: &ShmRef, data: &[u8]) -> Result<(), Status> {
        let region = self.region(r)?;
        let (start, len) = bounds(what, &region, r)?;
        if data.len() > len {
            return Err(Status::invalid_argument(format!(
                "{what} is {} bytes but its shared-memory place in region '{}' holds {len}",
                data.len(),
                r.region
            )));
        }
        // A truncation after `bounds` makes this write extend the object again (a `pwrite`
        // past the end grows a file), which is harmless: the client gets its bytes where it
        // asked for them, and the server no signal.
        region
            .file
            .write_all_at(data, region.offset + start)
            .map_err(|e| access_failed(what, &region, r, "write", &e))
    }
}

/// A failed `pread`/`pwrite`: a short read means the object shrank after the check.
fn access_failed(
    what: &str,
    region: &Region,
    r: &ShmRef,
    verb: &str,
    e: &std::io::Error,
) -> Status {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return shrank(what, region, r);
    }
    Status::internal(format!(
        "{what}: cannot {verb} the shared-memory object '{}' behind region '{}': {e}",
        region.key, r.region
    ))
}

fn shrank(what: &str, region: &Region, r: &ShmRef) -> Status {
    let len = region.file.metadata().map(|m| m.len()).unwrap_or(0);
    Status::failed_precondition(format!(
        "{what}: the shared-memory object '{}' behind region '{}' shrank to {len} bytes; register the region again",
        region.key, r.region
    ))
}

/// The shared-memory place a tensor's parameters name, if any. `shared_memory_region` and
/// `shared_memory_byte_size` come together; `shared_memory_offset` defaults to 0.
pub fn shm_ref(
    kind: &str,
    name: &str,
    params: &HashMap<String, InferParameter>,
) -> Result<Option<ShmRef>, Status> {
    let region = params.get("shared_memory_region");
    let size = params.get("shared_memory_byte_size");
    let offset = params.get("shared_memory_offset");
    if region.is_none() && size.is_none() && offset.is_none() {
        return Ok(None);
    }
    let what = format!("{kind} '{name}'");
    let region = match (region, size) {
        (Some(r), Some(_)) => match &r.parameter_choice {
            Some(ParameterChoice::StringParam(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "{what}: shared_memory_region must be a region name (a string)"
                )));
            }
        },
        _ => {
            return Err(Status::invalid_argument(format!(
                "{what}: shared_memory_region and shared_memory_byte_size must be given together"
            )));
        }
    };
    let number = |key: &str, p: &InferParameter| {
        unsigned_param(key, p)
            .map_err(|e| Status::invalid_argument(format!("{what}: {}", e.message())))
    };
    Ok(Some(ShmRef {
        region,
        offset: offset
            .map(|p| number("shared_memory_offset", p))
            .transpose()?
            .unwrap_or(0),
        byte_size: size.map_or(Ok(0), |p| number("shared_memory_byte_size", p))?,
    }))
}

/// [`shm_ref`] for parameters in their JSON form (KServe over HTTP): the same keys, the same
/// checks and messages. A JSON string is a string parameter, an integer an integer one; any
/// other value is refused by [`shm_ref`] as the wrong type.
pub fn shm_ref_json(
    kind: &str,
    name: &str,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<ShmRef>, Status> {
    use serde_json::Value;
    let mut converted = HashMap::new();
    for key in [
        "shared_memory_region",
        "shared_memory_byte_size",
        "shared_memory_offset",
    ] {
        let Some(value) = params.get(key) else {
            continue;
        };
        let choice = match value {
            Value::String(s) => Some(ParameterChoice::StringParam(s.clone())),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Some(ParameterChoice::Uint64Param(u)),
                (None, Some(i)) => Some(ParameterChoice::Int64Param(i)),
                _ => n.as_f64().map(ParameterChoice::DoubleParam),
            },
            Value::Bool(b) => Some(ParameterChoice::BoolParam(*b)),
            _ => None,
        };
        converted.insert(
            key.to_string(),
            InferParameter {
                parameter_choice: choice,
            },
        );
    }
    shm_ref(kind, name, &converted)
}

/// Refuses shared-memory inputs that together ask for more than `max_bytes` (the request
/// limit), before anything is read: a region may be far larger than a request may be.
pub fn check_total<'a>(
    places: impl IntoIterator<Item = &'a ShmRef>,
    max_bytes: u64,
) -> Result<(), Status> {
    let total = places
        .into_iter()
        .try_fold(0u64, |sum, p| sum.checked_add(p.byte_size));
    if total.is_none_or(|bytes| bytes > max_bytes) {
        return Err(Status::invalid_argument(format!(
            "the request's shared-memory inputs ask for {} bytes, more than limits.max_request_bytes ({max_bytes})",
            total.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string())
        )));
    }
    Ok(())
}

fn unknown(name: &str) -> Status {
    Status::not_found(format!("no shared-memory region '{name}' is registered"))
}

/// `r`'s start and length inside `region`, checked against the region and against the
/// object's current length. The length check gives an early, clear answer; it is not what keeps
/// the server safe (the object can shrink right after it): `pread` and `pwrite` are.
fn bounds(what: &str, region: &Region, r: &ShmRef) -> Result<(u64, usize), Status> {
    let end = r.offset.checked_add(r.byte_size);
    let Some(end) = end.filter(|end| *end <= region.byte_size) else {
        return Err(Status::invalid_argument(format!(
            "{what}: offset {} + byte_size {} is past the end of shared-memory region '{}' ({} bytes)",
            r.offset, r.byte_size, r.region, region.byte_size
        )));
    };
    let len = region.file.metadata().map(|m| m.len()).unwrap_or(0);
    if region.offset + end > len {
        return Err(shrank(what, region, r));
    }
    let len = usize::try_from(r.byte_size).map_err(|_| {
        Status::invalid_argument(format!(
            "{what}: byte_size {} is more than this server can hold",
            r.byte_size
        ))
    })?;
    Ok((r.offset, len))
}

/// The file behind a POSIX shared-memory key ("/name" or "name"): one path component.
fn object_path(key: &str) -> Result<PathBuf, String> {
    let name = key.strip_prefix('/').unwrap_or(key);
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!(
            "'{key}' is not a shared-memory key (expected '/name', one name without further '/')"
        ));
    }
    Ok(PathBuf::from(SHM_DIR).join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared-memory object of `len` bytes, removed on drop.
    struct Object(PathBuf, String);

    impl Object {
        fn new(tag: &str, len: u64) -> Self {
            let name = format!("veraltheim-test-{tag}-{}", std::process::id());
            let path = PathBuf::from(SHM_DIR).join(&name);
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(len).unwrap();
            Object(path, format!("/{name}"))
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn at(region: &str, offset: u64, byte_size: u64) -> ShmRef {
        ShmRef {
            region: region.into(),
            offset,
            byte_size,
        }
    }

    #[test]
    fn bytes_round_trip_through_a_region_and_the_object() {
        let obj = Object::new("rt", 4096);
        let shm = SharedMemory::new(true);
        shm.register("r", &obj.1, 1024, 64).unwrap();
        shm.write("output 'y'", &at("r", 8, 8), &[1, 2, 3, 4])
            .unwrap();
        assert_eq!(
            &shm.read("input 'x'", &at("r", 8, 4)).unwrap()[..],
            &[1, 2, 3, 4]
        );
        // The region starts 1024 bytes into the object: the client sees the bytes there.
        let file = std::fs::read(&obj.0).unwrap();
        assert_eq!(&file[1032..1036], &[1, 2, 3, 4]);
        let status = shm.status("").unwrap();
        assert_eq!(status.len(), 1);
        assert_eq!((status[0].offset, status[0].byte_size), (1024, 64));
        assert_eq!(status[0].key, obj.1);
    }

    #[test]
    fn bad_registrations_and_references_are_refused_by_name() {
        let obj = Object::new("bad", 128);
        let shm = SharedMemory::new(true);
        let e = shm.register("r", &obj.1, 100, 64).unwrap_err();
        assert!(e.message().contains("past the end"), "{e:?}");
        let e = shm
            .register("r", "/veraltheim-no-such-object", 0, 8)
            .unwrap_err();
        assert!(e.message().contains("cannot open"), "{e:?}");
        let e = shm.register("r", "/../etc/passwd", 0, 8).unwrap_err();
        assert!(e.message().contains("not a shared-memory key"), "{e:?}");
        assert_eq!(
            shm.register("r", &obj.1, 0, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        shm.register("r", &obj.1, 0, 64).unwrap();
        let e = shm.register("r", &obj.1, 0, 64).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let e = shm.read("input 'x'", &at("r", 60, 8)).unwrap_err();
        assert!(
            e.message().contains("input 'x'") && e.message().contains("past the end"),
            "{e:?}"
        );
        let e = shm
            .write("output 'y'", &at("r", 0, 4), &[0; 8])
            .unwrap_err();
        assert!(e.message().contains("8 bytes"), "{e:?}");
        let e = shm.read("input 'x'", &at("other", 0, 4)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        // The owner truncates its object: refused, not a SIGBUS.
        std::fs::File::options()
            .write(true)
            .open(&obj.0)
            .unwrap()
            .set_len(16)
            .unwrap();
        let e = shm.read("input 'x'", &at("r", 8, 16)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("shrank to 16 bytes"), "{e:?}");
        shm.unregister("r").unwrap();
        shm.unregister("r").unwrap();
        assert_eq!(shm.status("r").unwrap_err().code(), tonic::Code::NotFound);
    }

    #[test]
    fn an_object_truncated_while_requests_run_gives_errors_not_a_signal() {
        let obj = Object::new("trunc", 1 << 16);
        let shm = SharedMemory::new(true);
        shm.register("r", &obj.1, 4096, 60_000).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The client: shrinks its object below the region and grows it back, again and again,
        // so that some truncations land between the length check and the copy. With the
        // object mapped, such a copy was a SIGBUS that killed this test binary.
        let truncator = {
            let (path, stop) = (obj.0.clone(), stop.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::options().write(true).open(path).unwrap();
                let mut rounds = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 200 {
                    // A short pause in each state, so that requests meet both.
                    f.set_len(8192).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    f.set_len(1 << 16).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    rounds += 1;
                }
            })
        };
        let (mut ok, mut refused) = (0, 0);
        // Until both outcomes were seen a few times (the two threads share busy cores, so how
        // many tries that takes varies), within a bound.
        for i in 0..1_000_000 {
            if ok >= 20 && refused >= 20 {
                break;
            }
            let result = if i % 2 == 0 {
                shm.read("input 'x'", &at("r", 0, 60_000)).map(|_| ())
            } else {
                shm.write("output 'y'", &at("r", 0, 60_000), &[7u8; 60_000])
            };
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                    assert!(e.message().contains("region 'r'"), "{e:?}");
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        truncator.join().unwrap();
        assert!(
            ok >= 20 && refused >= 20,
            "{ok} succeeded, {refused} refused"
        );
        // Once the object has its length back, the region serves again.
        std::fs::File::options()
            .write(true)
            .open(&obj.0)
            .unwrap()
            .set_len(1 << 16)
            .unwrap();
        shm.write("output 'y'", &at("r", 0, 4), &[1, 2, 3, 4])
            .unwrap();
        assert_eq!(
            &shm.read("input 'x'", &at("r", 0, 4)).unwrap()[..],
            &[1, 2, 3, 4]
        );
    }

    #[test]
    fn links_and_objects_that_are_not_regular_files_are_refused() {
        let target = Object::new("target", 64);
        let link =
            PathBuf::from(SHM_DIR).join(format!("veraltheim-test-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target.0, &link).unwrap();
        let link_key = format!("/{}", link.file_name().unwrap().to_string_lossy());
        let shm = SharedMemory::new(true);
        let e = shm.register("r", &link_key, 0, 8).unwrap_err();
        let _ = std::fs::remove_file(&link);
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("cannot open"), "{e:?}");

        let fifo =
            PathBuf::from(SHM_DIR).join(format!("veraltheim-test-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let c_path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let fifo_key = format!("/{}", fifo.file_name().unwrap().to_string_lossy());
        let e = shm.register("r", &fifo_key, 0, 8).unwrap_err();
        let _ = std::fs::remove_file(&fifo);
        assert!(e.message().contains("not a regular file"), "{e:?}");
        assert!(shm.status("").unwrap().is_empty());
    }

    #[test]
    fn cuda_shared_memory_is_empty_unregisters_anything_and_refuses_registration() {
        let obj = Object::new("cuda", 64);
        for allowed in [false, true] {
            let shm = SharedMemory::new(allowed);
            assert!(shm.cuda_status("").is_ok());
            let e = shm.cuda_status("gpu0").unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound);
            assert!(
                e.message().contains("'gpu0'") && e.message().contains("not supported"),
                "{e:?}"
            );
            shm.cuda_unregister("").unwrap();
            shm.cuda_unregister("gpu0").unwrap();
            let e = shm.cuda_register("gpu0").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains("failed to register")
                    && e.message().contains("'gpu0'")
                    && e.message().contains("system shared memory"),
                "{e:?}"
            );
        }
        // A system region of that name is named as such, and a CUDA unregister leaves it be.
        let shm = SharedMemory::new(true);
        shm.register("sys", &obj.1, 0, 64).unwrap();
        let e = shm.cuda_status("sys").unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("system shared memory"), "{e:?}");
        shm.cuda_unregister("sys").unwrap();
        shm.cuda_unregister("").unwrap();
        assert_eq!(shm.status("sys").unwrap().len(), 1);
    }

    #[test]
    fn json_parameters_name_the_same_places_and_get_the_same_refusals_as_grpc_ones() {
        let json = |v: serde_json::Value| shm_ref_json("input", "x", v.as_object().unwrap());
        let place = json(serde_json::json!({
            "shared_memory_region": "r", "shared_memory_byte_size": 16, "shared_memory_offset": 8,
            "binary_data": false,
        }))
        .unwrap();
        assert_eq!(place, Some(at("r", 8, 16)));
        assert_eq!(
            json(serde_json::json!({"shared_memory_region": "r", "shared_memory_byte_size": 4}))
                .unwrap(),
            Some(at("r", 0, 4))
        );
        assert_eq!(
            json(serde_json::json!({"binary_data_size": 4})).unwrap(),
            None
        );
        for (params, want) in [
            (
                serde_json::json!({"shared_memory_region": "r"}),
                "given together",
            ),
            (
                serde_json::json!({"shared_memory_offset": 4}),
                "given together",
            ),
            (
                serde_json::json!({"shared_memory_region": ["r"], "shared_memory_byte_size": 4}),
                "must be a region name",
            ),
            (
                serde_json::json!({"shared_memory_region": "r", "shared_memory_byte_size": -1}),
                "'shared_memory_byte_size' must be a non-negative integer",
            ),
            (
                serde_json::json!({"shared_memory_region": "r", "shared_memory_byte_size": 4.5}),
                "'shared_memory_byte_size' must be a non-negative integer",
            ),
            (
                serde_json::json!({"shared_memory_region": "r", "shared_memory_byte_size": 4,
                                   "shared_memory_offset": "8"}),
                "'shared_memory_offset' must be a non-negative integer",
            ),
        ] {
            let e = json(params.clone()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{params}");
            assert!(
                e.message().starts_with("input 'x': ") && e.message().contains(want),
                "{params}: {e:?}"
            );
        }
    }

    #[test]
    fn shared_memory_inputs_together_are_bounded_by_the_request_limit() {
        check_total([&at("a", 0, 60), &at("b", 0, 40)], 100).unwrap();
        let e = check_total([&at("a", 0, 60), &at("b", 0, 41)], 100).unwrap_err();
        assert!(e.message().contains("ask for 101 bytes"), "{e:?}");
        let e = check_total([&at("a", 0, u64::MAX), &at("b", 0, 1)], 100).unwrap_err();
        assert!(e.message().contains("more than 2^64"), "{e:?}");
    }

    #[test]
    fn a_server_without_client_shm_refuses_every_call() {
        let obj = Object::new("off", 64);
        let shm = SharedMemory::new(false);
        let e = shm.register("r", &obj.1, 0, 64).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("--allow-client-shm"), "{e:?}");
        assert_eq!(
            shm.status("").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            shm.read("x", &at("r", 0, 1)).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
