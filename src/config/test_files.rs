//! Files for the configuration's unit tests: written to the system's temporary folder under
//! a name of their own (tests run in parallel), removed when dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A file in the system's temporary folder, removed when dropped; `.0` is its path.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A file ending in `name` (so its extension shows in messages) holding `contents`.
    pub fn new(name: &str, contents: &[u8]) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("wxgate-config-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
