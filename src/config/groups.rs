//! Who is in a group, as the system sees it, for `[[access.rule]]` `groups` and `gids`: every account
//! whose **primary** group it is (the gid of its passwd entry; such a user is usually *not* in the
//! group's member list, `useradd -g` and user-private groups put nobody there) and the group's
//! **listed members** (its supplementary members, `usermod -aG`). Resolved to uids at load and reload,
//! never per request, so a decision never waits on a name-service lookup.
//!
//! The primary groups come from `/etc/passwd`, the one passwd source that can be listed whole: an
//! account only a network source knows (LDAP, sssd) is in a group through that group's member list
//! alone.

use std::io;
use std::path::Path;

/// Where the passwd database's local accounts are.
pub(super) const PASSWD: &str = "/etc/passwd";

/// Each account's uid and primary gid, from a passwd file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct PrimaryGroups(Vec<(u32, u32)>);

impl PrimaryGroups {
    /// Reads the passwd file at `path`.
    pub(super) fn read(path: &Path) -> io::Result<Self> {
        std::fs::read_to_string(path).map(|text| Self::parse(&text))
    }

    /// `name:password:uid:gid:gecos:home:shell` lines; comments, blank lines, NIS `+`/`-` entries and
    /// lines without numeric ids are skipped.
    pub(super) fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with(['#', '+', '-']))
                .filter_map(|l| {
                    let mut fields = l.split(':');
                    let _name = fields.next().filter(|n| !n.is_empty())?;
                    let uid = fields.nth(1)?.trim().parse().ok()?;
                    let gid = fields.next()?.trim().parse().ok()?;
                    Some((uid, gid))
                })
                .collect(),
        )
    }

    /// The uids in group `gid`: those whose primary group it is, and `listed` (the uids of its member
    /// list), sorted, without duplicates.
    pub(super) fn members(&self, gid: u32, listed: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut uids: Vec<u32> = self.0.iter().filter(|(_, g)| *g == gid).map(|(u, _)| *u).chain(listed).collect();
        uids.sort_unstable();
        uids.dedup();
        uids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment

alice:x:1001:1001::/home/alice:/bin/sh
bob:x:1002:50::/home/bob:/bin/sh
carol:x:1003:50:Carol:/home/carol:/bin/sh
+nisuser::::::
broken:x:notanumber:50::/:/bin/sh
short:x:1009
:x:1010:50::/:/bin/sh
";

    #[test]
    fn a_group_has_the_users_whose_primary_group_it_is_and_its_listed_members() {
        let p = PrimaryGroups::parse(PASSWD_TEXT);
        assert_eq!(p.0, vec![(0, 0), (1001, 1001), (1002, 50), (1003, 50)]);
        assert_eq!(p.members(50, []), vec![1002, 1003], "primary group only");
        assert_eq!(p.members(50, [1001, 1003]), vec![1001, 1002, 1003], "and the listed members, once each");
        assert_eq!(p.members(1001, []), vec![1001], "a user-private group");
        assert_eq!(p.members(4242, [7]), vec![7], "nobody's primary group: its members");
        assert!(p.members(4242, []).is_empty());
    }

    #[test]
    fn the_passwd_file_is_read_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        std::fs::write(&path, PASSWD_TEXT).expect("write");
        assert_eq!(PrimaryGroups::read(&path).expect("read").members(50, []), vec![1002, 1003]);
        assert!(PrimaryGroups::read(&dir.path().join("missing")).is_err());
        assert!(PrimaryGroups::read(Path::new(PASSWD)).expect("this host's").members(0, []).contains(&0), "root");
    }
}
