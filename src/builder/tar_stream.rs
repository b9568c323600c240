//! Tar entries read one header at a time from a stream, with the GNU long name and long link records
//! and the pax extended header that describe an entry folded into it, as the tar crate's iterator
//! folds them. That iterator reads each of those records whole, however large its header says it is
//! (a 1 GiB long name was 4.7 GB of memory before any name check); here each is refused past
//! `RECORD_LIMIT`. GNU sparse entries are returned as they are, never expanded: the builder refuses
//! them.

use std::io::{self, Read};

/// The most a long name, long link or pax extended header record may hold. Genuine ones hold a
/// path (at most 4 KiB) or a few xattrs (each at most 64 KiB).
pub const RECORD_LIMIT: u64 = 1 << 20;

const BLOCK: u64 = 512;

/// An entry's header and what the records before it say about it.
pub struct TarEntry {
    /// Its header, with the pax `uid` and `gid` written in.
    pub header: tar::Header,
    /// Its path: the long name record's, else the pax `path`, else the header's.
    pub path: Vec<u8>,
    /// Its link target: the long link record's, else the pax `linkpath`, else the header's.
    pub link_name: Option<Vec<u8>>,
    /// Its data size: the pax `size`, else the header's.
    pub size: u64,
    pax: Option<Vec<u8>>,
}

impl TarEntry {
    /// The pax extended header's records, if one came before the entry.
    pub fn pax_extensions(&self) -> Option<tar::PaxExtensions<'_>> {
        self.pax.as_deref().map(tar::PaxExtensions::new)
    }
}

/// Reads a tar stream: `next_entry` for each header, then `Read` for that entry's data (what is left
/// unread is skipped before the next header).
pub struct TarStream<R> {
    inner: R,
    /// Data bytes of the current entry not yet read, then the padding to the next block.
    data_left: u64,
    padding: u64,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The first pax record `key` as a number; like the tar crate, none if a record before it is
/// malformed or its value is not a number.
fn pax_number(pax: &[u8], key: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(pax) {
        let ext = ext.ok()?;
        if ext.key_bytes() == key {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

fn pax_text(pax: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    tar::PaxExtensions::new(pax)
        .filter_map(|ext| ext.ok())
        .find(|ext| ext.key_bytes() == key)
        .map(|ext| ext.value_bytes().to_vec())
}

/// A long name or link record without the NUL GNU tar ends it with.
fn without_nul(mut record: Vec<u8>) -> Vec<u8> {
    if record.last() == Some(&0) {
        record.pop();
    }
    record
}

impl<R: Read> TarStream<R> {
    pub fn new(inner: R) -> Self {
        TarStream {
            inner,
            data_left: 0,
            padding: 0,
        }
    }

    /// The next entry, or none at the end-of-archive blocks. A stream that ends where a header
    /// should be is an error (an archive cut at an entry boundary).
    pub fn next_entry(&mut self) -> io::Result<Option<TarEntry>> {
        let mut long_name = None;
        let mut long_link = None;
        let mut pax = None;
        loop {
            let Some(mut header) = self.next_header()? else {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(invalid(
                        "members found describing a future member but no future member found"
                            .into(),
                    ));
                }
                return Ok(None);
            };
            let etype = header.entry_type();
            // Like the tar crate, the record types count only in a ustar or GNU header.
            let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
            let slot = match etype {
                _ if !recognized => None,
                tar::EntryType::GNULongName => Some((&mut long_name, "GNU long name")),
                tar::EntryType::GNULongLink => Some((&mut long_link, "GNU long link")),
                tar::EntryType::XHeader => Some((&mut pax, "pax extended header")),
                _ => None,
            };
            if let Some((slot, what)) = slot {
                if slot.is_some() {
                    return Err(invalid(format!(
                        "two {what} records describe the same member"
                    )));
                }
                *slot = Some(self.record(&header, what)?);
                continue;
            }
            // Record types (a pax global header) take no pax values of their own.
            let applies = !etype.is_pax_global_extensions();
            let pax_size = pax
                .as_deref()
                .filter(|_| applies)
                .and_then(|p| pax_number(p, b"size"));
            if let Some(p) = pax.as_deref().filter(|_| applies) {
                if let Some(uid) = pax_number(p, b"uid") {
                    header.set_uid(uid);
                }
                if let Some(gid) = pax_number(p, b"gid") {
                    header.set_gid(gid);
                }
            }
            let size = match pax_size {
                Some(size) => size,
                None => header.entry_size()?,
            };
            self.start_data(size)?;
            let path = match long_name {
                Some(name) => without_nul(name),
                None => pax
                    .as_deref()
                    .and_then(|p| pax_text(p, b"path"))
                    .unwrap_or_else(|| header.path_bytes().into_owned()),
            };
            let link_name = match long_link {
                Some(link) => Some(without_nul(link)),
                None => pax
                    .as_deref()
                    .and_then(|p| pax_text(p, b"linkpath"))
                    .or_else(|| header.link_name_bytes().map(|l| l.into_owned())),
            };
            return Ok(Some(TarEntry {
                header,
                path,
                link_name,
                size,
                pax,
            }));
        }
    }

    /// Skip what is left of the current entry, then read a header: none at an all-zero block.
    fn next_header(&mut self) -> io::Result<Option<tar::Header>> {
        self.skip(self.data_left + self.padding)?;
        self.data_left = 0;
        self.padding = 0;
        let mut header = tar::Header::new_old();
        let block = header.as_mut_bytes();
        let mut got = 0;
        while got < block.len() {
            match self.inner.read(&mut block[got..]) {
                Ok(0) if got == 0 => {
                    return Err(invalid(
                        "the archive ends without its end-of-archive blocks (truncated?)".into(),
                    ))
                }
                Ok(0) => return Err(invalid("the archive ends inside a header".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        // The checksum field itself counts as eight spaces.
        let sum: u32 = block[..148]
            .iter()
            .chain(&block[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 8 * u32::from(b' ');
        if header.cksum()? != sum {
            return Err(invalid("archive header checksum mismatch".into()));
        }
        Ok(Some(header))
    }

    fn start_data(&mut self, size: u64) -> io::Result<()> {
        self.data_left = size;
        self.padding = size
            .checked_next_multiple_of(BLOCK)
            .ok_or_else(|| invalid(format!("entry size {size} overflows")))?
            - size;
        Ok(())
    }

    /// A long name, long link or pax record's contents, refused past `RECORD_LIMIT` before any of
    /// it is read.
    fn record(&mut self, header: &tar::Header, what: &str) -> io::Result<Vec<u8>> {
        let size = header.entry_size()?;
        if size > RECORD_LIMIT {
            return Err(invalid(format!(
                "a {what} record of {size} bytes is too long (the limit is {RECORD_LIMIT})"
            )));
        }
        self.start_data(size)?;
        let mut record = vec![0u8; size as usize];
        self.read_exact(&mut record)?;
        Ok(record)
    }

    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        let skipped = io::copy(&mut (&mut self.inner).take(bytes), &mut io::sink())?;
        if skipped < bytes {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside an entry's data",
            ));
        }
        Ok(())
    }
}

/// The current entry's data.
impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.data_left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, link, size, uid, gid, pax records, data) of each entry, as the tar crate's iterator
    /// reads them.
    type Seen = Vec<(
        Vec<u8>,
        Option<Vec<u8>>,
        u64,
        u64,
        u64,
        Vec<Vec<u8>>,
        Vec<u8>,
    )>;

    fn crate_view(tar: &[u8]) -> Seen {
        let mut archive = tar::Archive::new(tar);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            // Skipped by both users, as global headers.
            if entry.header().entry_type().is_pax_global_extensions() {
                continue;
            }
            let pax = match entry.pax_extensions().unwrap() {
                Some(exts) => exts.map(|e| e.unwrap().key_bytes().to_vec()).collect(),
                None => Vec::new(),
            };
            let (path, link) = (
                entry.path_bytes().into_owned(),
                entry.link_name_bytes().map(|l| l.into_owned()),
            );
            let (size, uid, gid) = (
                entry.size(),
                entry.header().uid().unwrap(),
                entry.header().gid().unwrap(),
            );
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.push((path, link, size, uid, gid, pax, data));
        }
        seen
    }

    fn our_view(tar: &[u8]) -> Seen {
        let mut stream = TarStream::new(tar);
        let mut seen = Vec::new();
        while let Some(entry) = stream.next_entry().unwrap() {
            if entry.header.entry_type().is_pax_global_extensions() {
                continue;
            }
            let pax = match entry.pax_extensions() {
                Some(exts) => exts.map(|e| e.unwrap().key_bytes().to_vec()).collect(),
                None => Vec::new(),
            };
            let mut data = Vec::new();
            stream.read_to_end(&mut data).unwrap();
            let h = &entry.header;
            let (uid, gid) = (h.uid().unwrap(), h.gid().unwrap());
            seen.push((entry.path, entry.link_name, entry.size, uid, gid, pax, data));
        }
        seen
    }

    fn header(path: &[u8], etype: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(etype);
        h.set_size(size);
        h.set_uid(5);
        h.set_gid(6);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    /// A header and its data, padded to whole blocks.
    fn member(h: &tar::Header, data: &[u8]) -> Vec<u8> {
        let pad = data.len().next_multiple_of(512) - data.len();
        [h.as_bytes().as_slice(), data, &vec![0; pad]].concat()
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        // "<length> key=value\n", the length counting itself.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        [format!("{len} {key}=").as_bytes(), value, b"\n"].concat()
    }

    #[test]
    fn entries_read_as_the_tar_crate_reads_them() {
        let long_name = vec![b'n'; 700];
        let long_link = [b"t/".as_slice(), &[b'l'; 600], b"\0"].concat();
        let pax = [
            pax_record("path", b"pax/path"),
            pax_record("linkpath", b"pax/target"),
            pax_record("uid", b"70000"),
            pax_record("gid", b"80000"),
            pax_record("size", b"1000"),
            pax_record("SCHILY.xattr.user.a", b"v"),
        ]
        .concat();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let global = pax_record("comment", b"global");
        let mut tar = [
            member(&header(b"plain", tar::EntryType::Regular, 3), b"abc"),
            member(
                &header(b"././@LongLink", tar::EntryType::GNULongName, 700),
                &long_name,
            ),
            member(
                &header(b"././@LongLink", tar::EntryType::GNULongLink, 603),
                &long_link,
            ),
            member(&header(b"short", tar::EntryType::Symlink, 0), b""),
            member(
                &header(b"g", tar::EntryType::XGlobalHeader, global.len() as u64),
                &global,
            ),
            member(
                &header(b"x", tar::EntryType::XHeader, pax.len() as u64),
                &pax,
            ),
            // The header says 0 bytes; the pax size (1000) is what follows.
            member(&header(b"hdr", tar::EntryType::Regular, 0), &data),
            member(&header(b"after", tar::EntryType::Regular, 2), b"ok"),
        ]
        .concat();
        tar.extend([0; 1024]);
        let seen = our_view(&tar);
        assert_eq!(seen, crate_view(&tar));
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[1].0, long_name);
        assert_eq!(
            (seen[2].0.as_slice(), seen[2].2),
            (b"pax/path".as_slice(), 1000)
        );
    }

    #[test]
    fn records_past_the_limit_are_refused_unread() {
        for etype in [
            tar::EntryType::GNULongName,
            tar::EntryType::GNULongLink,
            tar::EntryType::XHeader,
        ] {
            // Only the header: the record's data is never read, so need not be there.
            let tar = header(b"r", etype, RECORD_LIMIT + 1).as_bytes().to_vec();
            let err = TarStream::new(tar.as_slice())
                .next_entry()
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("too long"), "{err}");
        }
    }
}
