//! A minimal writer for the Linux initramfs format: an uncompressed `newc` cpio archive.
//!
//! Format (Linux `Documentation/driver-api/early-userspace/buffer-format.rst`): each entry is
//! the magic `070701`, thirteen 8-digit hex fields, the NUL-terminated name padded to a
//! multiple of 4 bytes, then the data padded to a multiple of 4. The archive ends with an
//! entry named `TRAILER!!!`. Uncompressed archives unpack fastest under emulation.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Builds an archive in memory-bounded streaming fashion; parent directories are added
/// automatically, once.
pub struct Initramfs<W: Write> {
    out: W,
    next_inode: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Initramfs<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        Initramfs {
            out,
            next_inode: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds directory `path` (absolute, `/`-separated) and its parents.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let name = path.trim_matches('/');
        if name.is_empty() || self.dirs.contains(name) {
            return Ok(());
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(name.to_string());
        self.entry(name, S_IFDIR | 0o755, 2, 0, &[])
    }

    /// Adds a regular file with `mode` permission bits (e.g. 0o755) and `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(name, S_IFREG | (mode & 0o7777), 1, 0, data)
    }

    /// Adds host file `host` at `path`, keeping its executable bit.
    pub fn copy(&mut self, path: &str, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("could not read {}", host.display()))?;
        let executable = is_executable(host);
        let mode = if executable { 0o755 } else { 0o644 };
        self.file(path, mode, &data)
            .with_context(|| format!("could not add {} to the initramfs", host.display()))
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(name, S_IFCHR | 0o600, 1, (major << 8) | minor, &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let name_size = name.len() + 1;
        let header = format!(
            "070701{inode:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {major:08x}{minor:08x}{rmajor:08x}{rminor:08x}{name_size:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            major = 0,
            minor = 0,
            rmajor = rdev >> 8,
            rminor = rdev & 0xff,
            check = 0,
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name_size)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, written: usize) -> io::Result<()> {
        let padding = (4 - written % 4) % 4;
        self.out.write_all(&[0u8; 3][..padding])
    }
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(_path: &Path) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut Initramfs<Vec<u8>>)) -> Vec<u8> {
        let mut cpio = Initramfs::new(Vec::new());
        build(&mut cpio);
        cpio.finish().unwrap()
    }

    fn names(bytes: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at offset {at}");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                usize::from_str_radix(text, 16).unwrap()
            };
            let (size, name_size) = (field(6), field(11));
            let name = &bytes[at + 110..at + 110 + name_size - 1];
            names.push(String::from_utf8(name.to_vec()).unwrap());
            at += (110 + name_size).div_ceil(4) * 4;
            at += size.div_ceil(4) * 4;
        }
        names
    }

    #[test]
    fn entries_are_aligned_and_end_with_the_trailer() {
        let bytes = archive(|c| {
            c.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
            c.file("/a/b/c", 0o644, b"12345").unwrap();
        });
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(names(&bytes), ["init", "a", "a/b", "a/b/c", "TRAILER!!!"]);
    }

    #[test]
    fn parent_directories_are_added_once() {
        let bytes = archive(|c| {
            c.file("/x/one", 0o644, b"1").unwrap();
            c.file("/x/two", 0o644, b"2").unwrap();
            c.dir("/x").unwrap();
        });
        assert_eq!(names(&bytes), ["x", "x/one", "x/two", "TRAILER!!!"]);
    }

    #[test]
    fn file_mode_and_size_are_recorded() {
        let bytes = archive(|c| c.file("/bin/tool", 0o755, b"abc").unwrap());
        // Entries: bin, bin/tool. Skip the first.
        let first = (110 + 4usize).div_ceil(4) * 4;
        let header = std::str::from_utf8(&bytes[first..first + 110]).unwrap();
        assert_eq!(&header[14..22], format!("{:08x}", S_IFREG | 0o755));
        assert_eq!(&header[54..62], "00000003");
    }
}
