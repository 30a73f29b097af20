//! Reading the files a configuration is or names (the configuration itself, `[server.tls]`'s
//! certificate and key, `upstream.ca_file`, `cluster.secret_file`): never more than
//! [`MAX_FILE_BYTES`], so that a path to `/dev/zero`, a device or a runaway file is refused
//! at once, by its key, instead of read into memory until wxgate dies.

use std::io::Read;
use std::path::Path;

/// The most wxgate reads of a file: 4 MiB, hundreds of times a configuration, a certificate
/// chain, a key or a CA bundle (Mozilla's whole bundle is about 220 KiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A file larger than [`MAX_FILE_BYTES`]; each file's error wraps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("is larger than {} MiB (the most wxgate reads of a file)", MAX_FILE_BYTES >> 20)]
pub struct TooLarge;

/// Why a file could not be read.
#[derive(Debug)]
pub enum FileError {
    /// Opening or reading failed (the I/O error, which does not name the file).
    Unreadable(std::io::Error),
    /// More than [`MAX_FILE_BYTES`].
    TooLarge(TooLarge),
}

/// The bytes of the file at `path`, if it holds at most [`MAX_FILE_BYTES`] (one byte more is
/// read to tell).
pub fn read_limited(path: &Path) -> Result<Vec<u8>, FileError> {
    let file = std::fs::File::open(path).map_err(FileError::Unreadable)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(FileError::Unreadable)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooLarge(TooLarge));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_limit_is_read() {
        let zero = read_limited(Path::new("/dev/zero"));
        assert!(matches!(zero, Err(FileError::TooLarge(_))));
        assert_eq!(
            TooLarge.to_string(),
            "is larger than 4 MiB (the most wxgate reads of a file)"
        );
        assert!(matches!(
            read_limited(Path::new("/nonexistent/wxgate")),
            Err(FileError::Unreadable(_))
        ));
        let exact = super::super::test_files::TempFile::new("exact", &[b'x'; 4 << 20]);
        assert_eq!(read_limited(&exact.0).unwrap().len(), 4 << 20);
    }
}
