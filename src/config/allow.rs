//! `server.allow`: the addresses that may connect to the proxy port, as CIDR blocks or single
//! addresses. A connection from anywhere else is closed as it is accepted, before any of its
//! bytes is read: backends send app secrets through wxgate, and a port that only the backends
//! can use is one fewer place for a secret to be sent to by mistake, or guessed at.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Who may connect: everyone (the default, as before the key existed), or the addresses in
/// some blocks.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    /// `None`: everyone. Never `Some` of an empty list (validation refuses one).
    blocks: Option<Box<[IpNet]>>,
}

/// Why an entry of `server.allow` cannot be used. The messages never quote the entry: every
/// problem message of a configuration names a key, not a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowEntryError {
    /// Neither an address nor a CIDR block.
    #[error("not an IP address or CIDR block (such as \"10.0.0.0/8\", \"127.0.0.1\" or \"::1\")")]
    NotAnAddress,
    /// A block with bits set past its prefix (`10.0.0.1/8`): most likely a typo, and which
    /// block was meant cannot be told.
    #[error("has address bits set past its prefix length: write the block's first address (as in \"10.0.0.0/8\")")]
    HostBits,
}

impl AllowList {
    /// Everyone may connect.
    pub fn everyone() -> AllowList {
        AllowList { blocks: None }
    }

    /// Only these blocks; `None` if `blocks` is empty (which would refuse everyone).
    pub fn only(blocks: Vec<IpNet>) -> Option<AllowList> {
        (!blocks.is_empty()).then(|| AllowList {
            blocks: Some(blocks.into_boxed_slice()),
        })
    }

    /// Reads one entry: an address (a block of one) or a block in CIDR notation.
    pub fn parse_entry(entry: &str) -> Result<IpNet, AllowEntryError> {
        let entry = entry.trim();
        if let Ok(address) = entry.parse::<IpAddr>() {
            return Ok(IpNet::from(address));
        }
        let block: IpNet = entry.parse().map_err(|_| AllowEntryError::NotAnAddress)?;
        if block.trunc() != block {
            return Err(AllowEntryError::HostBits);
        }
        Ok(block)
    }

    /// Whether a client at `peer` may connect. An IPv4 client of a dual-stack listener
    /// arrives as `::ffff:a.b.c.d`, and is matched as `a.b.c.d`.
    pub fn allows(&self, peer: IpAddr) -> bool {
        match &self.blocks {
            None => true,
            // A few blocks in practice: a scan is as fast as anything cleverer.
            Some(blocks) => {
                let peer = peer.to_canonical();
                blocks.iter().any(|block| block.contains(&peer))
            }
        }
    }

    /// Whether everyone may connect.
    pub fn is_everyone(&self) -> bool {
        self.blocks.is_none()
    }
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.blocks {
            None => f.write_str("AllowList(everyone)"),
            Some(blocks) => f.debug_list().entries(blocks.iter()).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        let blocks = entries
            .iter()
            .map(|entry| AllowList::parse_entry(entry).unwrap())
            .collect();
        AllowList::only(blocks).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn addresses_and_blocks_admit_their_own_and_no_other() {
        let allow = list(&["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8"]);
        for yes in ["10.1.2.3", "127.0.0.1", "::1", "fd12::7", "::ffff:10.9.9.9"] {
            assert!(allow.allows(ip(yes)), "{yes}");
        }
        for no in [
            "11.0.0.1",
            "127.0.0.2",
            "::2",
            "192.168.1.1",
            "::ffff:127.0.0.2",
        ] {
            assert!(!allow.allows(ip(no)), "{no}");
        }
        assert!(AllowList::everyone().allows(ip("203.0.113.9")));
        assert!(AllowList::default().is_everyone());
        assert_eq!(AllowList::only(Vec::new()), None);
    }

    #[test]
    fn entries_that_are_not_a_block_are_refused() {
        for bad in [
            "",
            "localhost",
            "10.0.0.0/33",
            "10.0.0/8",
            "::1/129",
            "10.0.0.0/8 x",
        ] {
            assert_eq!(
                AllowList::parse_entry(bad),
                Err(AllowEntryError::NotAnAddress),
                "{bad:?}"
            );
        }
        assert_eq!(
            AllowList::parse_entry("10.0.0.1/8"),
            Err(AllowEntryError::HostBits)
        );
        assert_eq!(
            AllowList::parse_entry(" 192.168.0.0/16 ").unwrap(),
            "192.168.0.0/16".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            AllowList::parse_entry("2001:db8::1").unwrap(),
            "2001:db8::1/128".parse::<IpNet>().unwrap()
        );
    }
}
