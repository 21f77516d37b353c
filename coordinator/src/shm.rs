//! Triton's system shared-memory extension: a client registers a POSIX shared-memory object
//! (`shm_open`'s namespace, `/dev/shm` on Linux) as a named region, then passes input and
//! output tensors through it instead of in the request (parameters `shared_memory_region`,
//! `shared_memory_byte_size`, `shared_memory_offset`). Off unless the server is started with
//! `--allow-client-shm`, as in Triton: a registered region lets a client have the server read
//! and write a shared-memory object it names.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapMut, MmapOptions};
use parking_lot::{Mutex, RwLock};
use tonic::Status;
use veraltheim_proto::inference::InferParameter;
use veraltheim_proto::inference::infer_parameter::ParameterChoice;

use crate::convert::unsigned_param;

/// Where POSIX shared-memory objects live.
const SHM_DIR: &str = "/dev/shm";

/// One registered region: `byte_size` bytes of the object `key`, from `offset`.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
    map: Mutex<MmapMut>,
    /// The object, to check its length before each access: touching a mapping past the end
    /// of a file that its owner truncated kills the process with SIGBUS.
    file: std::fs::File,
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "shared-memory region '{name}': cannot open the object '{key}' ({}): {e}",
                    path.display()
                ))
            })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let end = offset.saturating_add(byte_size);
        if end > len {
            return Err(Status::invalid_argument(format!(
                "shared-memory region '{name}': offset {offset} + byte_size {byte_size} is past the end of '{key}' ({len} bytes)"
            )));
        }
        let size = usize::try_from(byte_size).map_err(|_| {
            Status::invalid_argument(format!(
                "shared-memory region '{name}': byte_size too large"
            ))
        })?;
        // SAFETY: the object is shared with the client by design and may change under us; we
        // only ever copy bytes in and out through raw pointers (`read`, `write`), never hand out
        // references into the mapping, and the length was checked against the file above.
        let map =
            unsafe { MmapOptions::new().offset(offset).len(size).map_mut(&file) }.map_err(|e| {
                Status::internal(format!(
                    "shared-memory region '{name}': cannot map '{key}': {e}"
                ))
            })?;
        regions.insert(
            name.to_string(),
            Arc::new(Region {
                name: name.to_string(),
                key: key.to_string(),
                offset,
                byte_size,
                map: Mutex::new(map),
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

    /// Copies the bytes `r` names out of its region.
    pub fn read(&self, what: &str, r: &ShmRef) -> Result<Bytes, Status> {
        let region = self.region(r)?;
        let (start, len) = bounds(what, &region, r)?;
        let map = region.map.lock();
        let mut out = vec![0u8; len];
        // SAFETY: `start + len` is within the mapping (`bounds`); copying through raw pointers
        // takes no reference to memory the client may be writing.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(start), out.as_mut_ptr(), len) };
        Ok(Bytes::from(out))
    }

    /// Copies `data` into the place `r` names; `data` may be shorter than `r.byte_size`.
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
        let mut map = region.map.lock();
        // SAFETY: as in `read`; `start + data.len()` is within the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), map.as_mut_ptr().add(start), data.len())
        };
        Ok(())
    }
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

fn unknown(name: &str) -> Status {
    Status::not_found(format!("no shared-memory region '{name}' is registered"))
}

/// `r`'s start and length inside `region`, checked against the region and against the
/// object's current length. (A client that truncates its object between this check and the
/// copy can still crash the server: one reason the extension is off by default, as in Triton.)
fn bounds(what: &str, region: &Region, r: &ShmRef) -> Result<(usize, usize), Status> {
    let end = r.offset.checked_add(r.byte_size);
    let Some(end) = end.filter(|end| *end <= region.byte_size) else {
        return Err(Status::invalid_argument(format!(
            "{what}: offset {} + byte_size {} is past the end of shared-memory region '{}' ({} bytes)",
            r.offset, r.byte_size, r.region, region.byte_size
        )));
    };
    let len = region.file.metadata().map(|m| m.len()).unwrap_or(0);
    if region.offset + end > len {
        return Err(Status::failed_precondition(format!(
            "{what}: the shared-memory object '{}' behind region '{}' shrank to {len} bytes; register the region again",
            region.key, r.region
        )));
    }
    Ok((r.offset as usize, r.byte_size as usize))
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
