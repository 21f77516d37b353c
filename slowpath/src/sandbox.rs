//! What a local command job may touch: the user and group it runs as, its environment, its own
//! folder, its resource limits, the programs it may start and (where the machine allows it) its
//! cgroup. The `local` module's `LocalExecutor` applies a [`Sandbox`] to every attempt it starts.
//!
//! Everything that must happen in the child between `fork` and `exec` is prepared beforehand
//! (paths as C strings, limits as `rlimit`s) and done by [`Entry::enter`] with plain system
//! calls, which are async-signal-safe: no allocation, no lock, no logging in the child.
//!
//! The order in the child: join the attempt's cgroup (while still root), set the rlimits, set
//! `no_new_privs` (a setuid program cannot give the job back any privilege), enter the job's
//! folder (as root, so that its ancestors need not be searchable), drop to the configured group
//! and user (`setgroups`, `setgid`, `setuid`), then — as the job's user, so that it reaches only
//! what that user may reach — make and enter the job's own `working_dir`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// The `PATH` of local jobs unless `jobs.local.path` says otherwise.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The unprivileged user and group local jobs run as (`jobs.local.run_as`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// As configured, e.g. `nobody:nogroup`.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for RunAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

impl RunAs {
    /// `USER:GROUP`, `USER` (its primary group) or numeric `UID:GID`, resolved through the
    /// system's user database (NSS). Root (uid or gid 0) is refused: it is what this is for.
    pub fn resolve(spec: &str) -> Result<RunAs, String> {
        let spec = spec.trim();
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(format!(
                "'{spec}' is not USER:GROUP, USER or UID:GID (e.g. nobody:nogroup)"
            ));
        }
        let numeric = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        let (uid, primary) = if numeric(user) {
            let uid = user
                .parse::<u32>()
                .map_err(|_| format!("uid '{user}' is out of range"))?;
            (uid, None)
        } else {
            match lookup_user(user)? {
                Some((uid, gid)) => (uid, Some(gid)),
                None => return Err(format!("no user named '{user}' on this machine")),
            }
        };
        let gid = match group {
            Some(g) if numeric(g) => g
                .parse::<u32>()
                .map_err(|_| format!("gid '{g}' is out of range"))?,
            Some(g) => {
                lookup_group(g)?.ok_or_else(|| format!("no group named '{g}' on this machine"))?
            }
            None => primary.ok_or_else(|| {
                format!("'{spec}' is a numeric uid: give its group too, as UID:GID")
            })?,
        };
        if uid == 0 || gid == 0 {
            return Err(format!(
                "'{spec}' is uid {uid}, gid {gid}: jobs would run with root's rights; name an unprivileged user and group (e.g. nobody:nogroup)"
            ));
        }
        Ok(RunAs {
            name: spec.to_owned(),
            uid,
            gid,
        })
    }
}

/// Calls `f` with a growing buffer while it answers ERANGE (the `get*_r` functions).
fn with_buffer<T>(mut f: impl FnMut(&mut [libc::c_char]) -> Result<T, i32>) -> Result<T, String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        match f(&mut buf) {
            Err(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 2, 0),
            Err(e) => {
                return Err(format!(
                    "the user database cannot be read: {}",
                    std::io::Error::from_raw_os_error(e)
                ));
            }
            Ok(v) => return Ok(v),
        }
    }
}

/// (uid, primary gid) of user `name`; `None` if there is none.
fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, String> {
    let cname = CString::new(name).map_err(|_| format!("user name '{name}' has a NUL byte"))?;
    with_buffer(|buf| {
        // SAFETY: every pointer is valid for the call; `buf` outlives it and `pwd` is only read
        // when `result` says it was filled.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            match rc {
                0 if result.is_null() => Ok(None),
                0 => Ok(Some((pwd.pw_uid, pwd.pw_gid))),
                e => Err(e),
            }
        }
    })
}

/// The gid of group `name`; `None` if there is none.
fn lookup_group(name: &str) -> Result<Option<u32>, String> {
    let cname = CString::new(name).map_err(|_| format!("group name '{name}' has a NUL byte"))?;
    with_buffer(|buf| {
        // SAFETY: as in `lookup_user`.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            match rc {
                0 if result.is_null() => Ok(None),
                0 => Ok(Some(grp.gr_gid)),
                e => Err(e),
            }
        }
    })
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Resource limits of every local job (`setrlimit`, soft and hard); `None`: the server's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_AS: bytes of virtual address space of each process.
    pub address_space_bytes: Option<u64>,
    /// RLIMIT_CPU: CPU seconds of each process; SIGXCPU at the limit, SIGKILL 5 s later.
    pub cpu_seconds: Option<u64>,
    /// RLIMIT_NOFILE: open file descriptors of each process.
    pub open_files: Option<u64>,
    /// RLIMIT_NPROC: processes and threads of the job's user, all its jobs together. The kernel
    /// does not apply it to root.
    pub processes: Option<u64>,
}

impl Limits {
    fn rlimits(&self) -> [Option<libc::rlimit>; 4] {
        let r = |soft: u64, hard: u64| libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        [
            self.address_space_bytes.map(|v| r(v, v)),
            self.cpu_seconds
                .map(|v| r(v, v.saturating_add(CPU_GRACE_SECONDS))),
            self.open_files.map(|v| r(v, v)),
            self.processes.map(|v| r(v, v)),
        ]
    }

    /// The first limit (as its `jobs.local` key, the configured value and the hard limit) that
    /// lies above this process's own hard limit. Only root may raise a hard limit: a server
    /// that is not root could not start any job with it.
    pub fn above_own_hard(&self) -> Option<(&'static str, u64, u64)> {
        let own_hard = |resource| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct we own and nothing else.
            let rc = unsafe { libc::getrlimit(resource, &mut r) };
            (rc == 0 && r.rlim_max != libc::RLIM_INFINITY).then_some(r.rlim_max)
        };
        let rlimits = self.rlimits();
        [
            (
                "max_address_space_bytes",
                libc::RLIMIT_AS,
                self.address_space_bytes,
            ),
            ("max_cpu_seconds", libc::RLIMIT_CPU, self.cpu_seconds),
            ("max_open_files", libc::RLIMIT_NOFILE, self.open_files),
            ("max_processes", libc::RLIMIT_NPROC, self.processes),
        ]
        .into_iter()
        .zip(rlimits)
        .find_map(|((key, resource, value), wanted)| {
            let (value, wanted) = (value?, wanted?);
            let hard = own_hard(resource)?;
            (wanted.rlim_max > hard).then_some((key, value, hard))
        })
    }

    /// For people: which limits are set.
    pub fn describe(&self) -> String {
        let show = |v: Option<u64>, unit: &str| match v {
            Some(v) => format!("{v}{unit}"),
            None => "unlimited (the server's)".to_owned(),
        };
        format!(
            "address space {}, CPU {}, open files {}, processes {}",
            show(self.address_space_bytes, " bytes"),
            show(self.cpu_seconds, " s"),
            show(self.open_files, ""),
            show(self.processes, ""),
        )
    }
}

/// Seconds between SIGXCPU (the soft CPU limit) and SIGKILL (the hard one).
const CPU_GRACE_SECONDS: u64 = 5;

/// A delegated cgroup v2 folder (`jobs.local.cgroup_dir`) in which each attempt gets a cgroup of
/// its own, with `memory.max` and `cpu.max` from the job's resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    pub dir: PathBuf,
}

/// The period of `cpu.max`, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

impl Cgroups {
    /// Checks that `dir` is a cgroup v2 folder whose children get the memory and cpu
    /// controllers (its `cgroup.subtree_control` lists them).
    pub fn open(dir: &Path) -> Result<Cgroups, String> {
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).map_err(|e| {
            format!(
                "{} is not a cgroup v2 folder ({}: {e})",
                dir.display(),
                control.display()
            )
        })?;
        let enabled: BTreeSet<&str> = enabled.split_whitespace().collect();
        let missing: Vec<&str> = ["memory", "cpu"]
            .into_iter()
            .filter(|c| !enabled.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} does not give its children the {} controller(s): enable them with `echo '+memory +cpu' > {}`",
                dir.display(),
                missing.join(" and "),
                control.display()
            ));
        }
        Ok(Cgroups {
            dir: dir.to_owned(),
        })
    }

    /// Whether this machine has the cgroup v2 (unified) hierarchy at all.
    pub fn machine_has_v2() -> bool {
        Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
    }

    /// Makes the cgroup of an attempt, limited to `memory_bytes` and `cpu_millis` (0: no limit).
    pub fn create(
        &self,
        name: &str,
        memory_bytes: u64,
        cpu_millis: u64,
    ) -> std::io::Result<PathBuf> {
        let dir = self.dir.join(name);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let memory = if memory_bytes > 0 {
            memory_bytes.to_string()
        } else {
            "max".to_owned()
        };
        std::fs::write(dir.join("memory.max"), memory)?;
        let cpu = if cpu_millis > 0 {
            format!(
                "{} {CPU_PERIOD_US}",
                (cpu_millis * CPU_PERIOD_US / 1000).max(1000)
            )
        } else {
            format!("max {CPU_PERIOD_US}")
        };
        std::fs::write(dir.join("cpu.max"), cpu)?;
        Ok(dir)
    }

    /// Kills what is left in an attempt's cgroup (`cgroup.kill`, where the kernel has it) and
    /// removes it; a failure is logged, never fatal.
    pub fn remove(cgroup: &Path) {
        let kill = cgroup.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        }
        if let Err(e) = std::fs::remove_dir(cgroup) {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "cannot remove a job's cgroup");
        }
    }
}

/// Who runs local jobs, with what, under which limits. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// `None`: jobs run as the server's own user.
    pub run_as: Option<RunAs>,
    pub limits: Limits,
    /// `PATH` of every job, and where programs (and `allowed_commands`) are looked up.
    pub path: String,
    /// `jobs.local.allowed_commands`, each resolved to its file; `None`: any program.
    allowed: Option<BTreeMap<PathBuf, String>>,
    pub cgroups: Option<Cgroups>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            run_as: None,
            limits: Limits::default(),
            path: DEFAULT_PATH.to_owned(),
            allowed: None,
            cgroups: None,
        }
    }
}

impl Sandbox {
    /// Only the programs `names` (names looked up on [`Sandbox::path`], or absolute paths) may
    /// be started; empty: any. Each must exist now.
    pub fn with_allowed_commands(mut self, names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            self.allowed = None;
            return Ok(self);
        }
        let mut allowed = BTreeMap::new();
        for name in names {
            let file = resolve(name, &self.path).ok_or_else(|| {
                format!(
                    "'{name}' is not an executable file (looked up on the jobs' PATH {})",
                    self.path
                )
            })?;
            allowed.insert(file, name.clone());
        }
        self.allowed = Some(allowed);
        Ok(self)
    }

    /// The allowed programs as configured; `None`: any.
    pub fn allowed_commands(&self) -> Option<Vec<&str>> {
        self.allowed
            .as_ref()
            .map(|a| a.values().map(String::as_str).collect())
    }

    /// The program to execute for `command`: with an allow-list, the allowed file it resolves
    /// to (so what runs is what was checked); without, the name as given (looked up on the
    /// job's PATH by `execvp`). Refused, saying why, when it is not allowed.
    pub fn program(&self, command: &[String]) -> Result<PathBuf, String> {
        let program = command.first().ok_or("the command is empty")?;
        let Some(allowed) = &self.allowed else {
            return Ok(PathBuf::from(program));
        };
        let refused =
            || format!("command '{program}' is not allowed (jobs.local.allowed_commands)");
        if program.contains('/') && !program.starts_with('/') {
            return Err(format!(
                "{}: give a name found on PATH or an absolute path, not a relative one",
                refused()
            ));
        }
        match resolve(program, &self.path) {
            Some(file) if allowed.contains_key(&file) => Ok(file),
            _ => Err(refused()),
        }
    }

    /// What a command job must pass at submit: an allowed program and, with an allow-list, no
    /// `LD_*` variable (the dynamic loader would run other code inside an allowed program).
    pub fn check(&self, command: &[String], env: &BTreeMap<String, String>) -> Result<(), String> {
        self.program(command)?;
        if self.allowed.is_some()
            && let Some(var) = env.keys().find(|k| k.starts_with("LD_"))
        {
            return Err(format!(
                "environment variable {var} is not allowed with jobs.local.allowed_commands (the dynamic loader would run other code inside an allowed program)"
            ));
        }
        Ok(())
    }

    /// The outermost folder on the way to `dir` (itself included) that the jobs' user may not
    /// search, judged by its mode bits (ACLs are not read). Jobs still start in their folder
    /// (entered before the switch of user), but cannot reach it, their `HOME`, by its path.
    pub fn unsearchable_ancestor(&self, dir: &Path) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let r = self.run_as.as_ref()?;
        let dir = std::path::absolute(dir).ok()?;
        let mut ancestors: Vec<&Path> = dir.ancestors().collect();
        ancestors.reverse();
        ancestors.into_iter().find_map(|folder| {
            let m = std::fs::metadata(folder).ok()?;
            let bit = if m.uid() == r.uid {
                0o100
            } else if m.gid() == r.gid {
                0o010
            } else {
                0o001
            };
            (m.mode() & bit == 0).then(|| folder.to_owned())
        })
    }

    /// One line for the log at start: who jobs run as and which limits are in force.
    pub fn describe(&self) -> String {
        let me = effective_uid();
        let user = match &self.run_as {
            Some(r) => format!("as {r}"),
            None if me == 0 => "as root (the server's user; set jobs.local.run_as)".to_owned(),
            None => format!("as the server's user (uid {me})"),
        };
        let nproc = match (&self.run_as, self.limits.processes) {
            (None, Some(_)) if me == 0 => "; the process limit is not enforced for root",
            _ => "",
        };
        let cgroup = match &self.cgroups {
            Some(c) => format!(
                "cgroup v2 memory.max and cpu.max from each job's resources, under {}",
                c.dir.display()
            ),
            None if Cgroups::machine_has_v2() => {
                "no cgroup limits (jobs.local.cgroup_dir is unset)".to_owned()
            }
            None => "no cgroup limits (this machine has no cgroup v2)".to_owned(),
        };
        let allowed = match self.allowed_commands() {
            Some(a) => format!("only {}", a.join(", ")),
            None => "any program".to_owned(),
        };
        format!(
            "local jobs run {user}, with a clean environment (PATH={}), in their own folder; rlimits: {}{nproc}; {cgroup}; {allowed}",
            self.path,
            self.limits.describe()
        )
    }

    /// What the child does before `exec` for an attempt whose folder is `home`, whose
    /// `working_dir` is `working_dir` (empty: `home`) and whose cgroup is `cgroup`.
    pub(crate) fn entry(
        &self,
        home: &Path,
        working_dir: &str,
        cgroup: Option<&Path>,
    ) -> Result<Entry, String> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| format!("path {} has a NUL byte", p.display()))
        };
        let mut mkdirs = Vec::new();
        let workdir = if working_dir.is_empty() {
            None
        } else {
            let wd = Path::new(working_dir);
            if wd.is_relative() {
                // Made (as the job's user) component by component under its folder.
                let mut prefix = PathBuf::new();
                for part in wd.components() {
                    prefix.push(part);
                    mkdirs.push(c(&prefix)?);
                }
            }
            Some(c(wd)?)
        };
        Ok(Entry {
            rlimits: self.limits.rlimits(),
            home: c(home)?,
            ids: self.run_as.as_ref().map(|r| (r.uid, r.gid)),
            mkdirs,
            workdir,
            cgroup_procs: cgroup.map(|g| c(&g.join("cgroup.procs"))).transpose()?,
        })
    }
}

/// A program on `path`, or an absolute path, that is an executable file; its folder resolved
/// (symlinks, so `/bin/sh` and `/usr/bin/sh` are one file where /bin links to /usr/bin), its
/// name kept (a multi-call binary such as busybox acts by the name it was started as).
fn resolve(program: &str, path: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.starts_with('/') {
        Some(PathBuf::from(program)).filter(|p| executable(p))
    } else if program.is_empty() || program.contains('/') {
        None
    } else {
        path.split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| Path::new(dir).join(program))
            .find(|p| executable(p))
    }?;
    let name = found.file_name()?.to_owned();
    let dir = found.parent()?.canonicalize().ok()?;
    Some(dir.join(name))
}

/// Everything the child needs between `fork` and `exec`, prepared in the parent.
pub(crate) struct Entry {
    rlimits: [Option<libc::rlimit>; 4],
    home: CString,
    ids: Option<(u32, u32)>,
    mkdirs: Vec<CString>,
    workdir: Option<CString>,
    cgroup_procs: Option<CString>,
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Entry {
    /// Runs in the child after `fork`: system calls only (async-signal-safe), no allocation.
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        // SAFETY: each call gets pointers to memory prepared before the fork (valid C strings,
        // initialised structs) and only changes this (child) process.
        unsafe {
            if let Some(procs) = &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
            let [address_space, cpu, open_files, processes] = &self.rlimits;
            if let Some(r) = address_space {
                check(libc::setrlimit(libc::RLIMIT_AS, r))?;
            }
            if let Some(r) = cpu {
                check(libc::setrlimit(libc::RLIMIT_CPU, r))?;
            }
            if let Some(r) = open_files {
                check(libc::setrlimit(libc::RLIMIT_NOFILE, r))?;
            }
            if let Some(r) = processes {
                check(libc::setrlimit(libc::RLIMIT_NPROC, r))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // The usual mask, whatever the server's (which may keep its own files private).
            libc::umask(0o022);
            check(libc::chdir(self.home.as_ptr()))?;
            if let Some((uid, gid)) = self.ids {
                let groups = [gid as libc::gid_t];
                check(libc::setgroups(1, groups.as_ptr()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            for dir in &self.mkdirs {
                if libc::mkdir(dir.as_ptr(), 0o755) != 0 {
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::EEXIST) {
                        return Err(err);
                    }
                }
            }
            if let Some(dir) = &self.workdir {
                check(libc::chdir(dir.as_ptr()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_resolves_names_and_numbers_and_refuses_root() {
        let r = RunAs::resolve("nobody:nogroup").unwrap();
        assert_ne!(r.uid, 0);
        assert_ne!(r.gid, 0);
        assert_eq!(r.name, "nobody:nogroup");
        // A user alone takes its primary group.
        let alone = RunAs::resolve("nobody").unwrap();
        assert_eq!(alone.uid, r.uid);
        let n = RunAs::resolve("12345:23456").unwrap();
        assert_eq!((n.uid, n.gid), (12345, 23456));

        let err = |s: &str| RunAs::resolve(s).unwrap_err();
        assert!(err("root").contains("root's rights"), "{}", err("root"));
        assert!(err("0:0").contains("uid 0"), "{}", err("0:0"));
        assert!(
            err("nobody:root").contains("gid 0"),
            "{}",
            err("nobody:root")
        );
        assert!(
            err("no-such-user-vt:nogroup").contains("no user named 'no-such-user-vt'"),
            "{}",
            err("no-such-user-vt:nogroup")
        );
        assert!(
            err("nobody:no-such-group-vt").contains("no group named 'no-such-group-vt'"),
            "{}",
            err("nobody:no-such-group-vt")
        );
        assert!(err("12345").contains("UID:GID"), "{}", err("12345"));
        assert!(err(":x").contains("USER:GROUP"), "{}", err(":x"));
        assert!(err("99999999999:1").contains("out of range"));
    }

    fn script(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\ntrue\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn the_allow_list_resolves_through_the_path_and_refuses_the_rest() {
        let bin = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let ok = script(bin.path(), "ok-tool");
        script(bin.path(), "other-tool");
        let shadow = script(other.path(), "ok-tool");
        let path = format!("{}:/usr/bin:/bin", bin.path().display());
        let sandbox = Sandbox {
            path,
            ..Sandbox::default()
        }
        .with_allowed_commands(&["ok-tool".into(), "/bin/sh".into()])
        .unwrap();
        let canonical = bin.path().canonicalize().unwrap().join("ok-tool");
        assert_eq!(sandbox.program(&["ok-tool".into()]).unwrap(), canonical);
        // The same file by its absolute path.
        assert_eq!(
            sandbox
                .program(&[ok.to_string_lossy().into_owned()])
                .unwrap(),
            canonical
        );
        assert!(sandbox.program(&["sh".into()]).is_ok());
        let refused = |cmd: &str| sandbox.program(&[cmd.to_owned()]).unwrap_err();
        assert_eq!(
            refused("other-tool"),
            "command 'other-tool' is not allowed (jobs.local.allowed_commands)"
        );
        // A file of the same name elsewhere is another program.
        assert!(refused(&shadow.to_string_lossy()).contains("is not allowed"));
        assert!(refused("./ok-tool").contains("not a relative one"));
        assert!(refused("no-such-tool").contains("'no-such-tool' is not allowed"));
        // The loader's variables would run other code inside an allowed program.
        let env = BTreeMap::from([("LD_PRELOAD".to_owned(), "/tmp/x.so".to_owned())]);
        let err = sandbox.check(&["ok-tool".into()], &env).unwrap_err();
        assert!(err.contains("LD_PRELOAD"), "{err}");
        assert!(sandbox.check(&["ok-tool".into()], &BTreeMap::new()).is_ok());

        // Without a list any program passes, as given.
        let open = Sandbox::default();
        assert_eq!(
            open.program(&["anything".into()]).unwrap(),
            PathBuf::from("anything")
        );
        assert!(open.check(&["anything".into()], &env).is_ok());
        // An entry that is no program is refused at start.
        let err = Sandbox::default()
            .with_allowed_commands(&["no-such-tool-vt".into()])
            .unwrap_err();
        assert!(
            err.contains("'no-such-tool-vt' is not an executable"),
            "{err}"
        );
    }

    #[test]
    fn a_limit_above_the_servers_own_hard_limit_is_found() {
        let mut own = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
        assert_ne!(
            own.rlim_max,
            libc::RLIM_INFINITY,
            "open files are always bounded"
        );
        let hard = own.rlim_max;
        let within = Limits {
            open_files: Some(hard),
            ..Limits::default()
        };
        assert_eq!(within.above_own_hard(), None);
        let above = Limits {
            open_files: Some(hard + 1),
            ..Limits::default()
        };
        assert_eq!(
            above.above_own_hard(),
            Some(("max_open_files", hard + 1, hard))
        );
    }

    #[test]
    fn a_folder_the_jobs_user_cannot_search_is_found() {
        let top = tempfile::tempdir().unwrap();
        let inner = top.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        for (p, mode) in [(top.path(), 0o755), (&top.path().join("a"), 0o700)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let jailed = Sandbox {
            run_as: Some(RunAs {
                name: "t".into(),
                uid: 54321,
                gid: 54321,
            }),
            ..Sandbox::default()
        };
        assert_eq!(
            jailed.unsearchable_ancestor(&inner),
            Some(top.path().join("a"))
        );
        std::fs::set_permissions(top.path().join("a"), std::fs::Permissions::from_mode(0o711))
            .unwrap();
        assert_eq!(jailed.unsearchable_ancestor(&inner), None);
        // Jobs running as the server's own user reach what it reaches.
        std::fs::set_permissions(top.path().join("a"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        assert_eq!(Sandbox::default().unsearchable_ancestor(&inner), None);
    }

    #[test]
    fn a_cgroup_folder_must_give_memory_and_cpu_to_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let err = Cgroups::open(dir.path()).unwrap_err();
        assert!(err.contains("is not a cgroup v2 folder"), "{err}");
        std::fs::write(dir.path().join("cgroup.subtree_control"), "cpu pids\n").unwrap();
        let err = Cgroups::open(dir.path()).unwrap_err();
        assert!(err.contains("the memory controller"), "{err}");
        std::fs::write(dir.path().join("cgroup.subtree_control"), "cpu memory\n").unwrap();
        let cg = Cgroups::open(dir.path()).unwrap();
        let job = cg.create("j-1", 256 << 20, 1500).unwrap();
        let read = |f: &str| std::fs::read_to_string(job.join(f)).unwrap();
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "150000 100000");
        let job = cg.create("j-2", 0, 0).unwrap();
        let read = |f: &str| std::fs::read_to_string(job.join(f)).unwrap();
        assert_eq!(
            (read("memory.max"), read("cpu.max")),
            ("max".into(), "max 100000".into())
        );
    }
}
