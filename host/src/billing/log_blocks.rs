//! How usage rows sit in the `logs` tree: in blocks of 8 consecutive row
//! ids (key `B` + the block number, big-endian), each block the JSON of its
//! rows, one per line, in id order. sled keeps about 33 bytes in memory for
//! every key of a tree whether or not its page is cached, so a key per row
//! made a node's memory grow with its usage log for good (70 MB more for
//! 1.7 million rows, at idle after a restart); a key per 8 rows makes that
//! an eighth. (Bigger blocks cost more while writing: a sled leaf holds 16
//! keys whatever their size, and is rewritten whole.)
//!
//! Stores from before blocks hold one row per key (the id, big-endian:
//! keys below any block's, as every row id is below `B`'s first byte).
//! Both are read the same way — such a value is a block of one row — and
//! new rows always go to blocks, so the log stays in id order.
//!
//! A block is stored LZ4-compressed (a `0` byte, the lines' length as a
//! little-endian `u32`, then the LZ4 block): sled keeps the values of
//! recently written leaves in memory (its cache evicts a page only when
//! one of its 256 shards has seen 64 accesses), so under a steady stream
//! of rows what a node holds grows with the size of a block's value. Blocks
//! written before compression (plain lines, starting with `{`) are read as
//! they are and compressed when next written.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use super::journal::RowJson;
use super::logs::LogRow;

/// First byte of a block's key.
const TAG: u8 = b'B';
/// Row ids per block (a power of two): 8.
const SHIFT: u32 = 3;
/// Row ids are below this (the smallest id whose key would start with
/// [`TAG`]); so are the keys of rows stored one per key.
const ID_LIMIT: u64 = (TAG as u64) << 56;

/// The key of the block holding row `id`.
pub fn key(id: u64) -> [u8; 9] {
    let mut k = [TAG; 9];
    k[1..].copy_from_slice(&(id >> SHIFT).to_be_bytes());
    k
}

/// First byte of a compressed block (a row's JSON starts with `{`).
const LZ4: u8 = 0;
/// Bytes before a compressed block's LZ4 data: the tag and the length.
const LZ4_HEADER: usize = 5;
/// Largest decompressed block accepted: a corrupt length is refused
/// rather than allocated.
const MAX_BLOCK: usize = 16 << 20;

/// The value stored for a block of `lines` (rows' JSON, without
/// newlines): the lines, each ended by a newline, LZ4-compressed behind a
/// short header (a block larger than [`MAX_BLOCK`], which only rows with
/// huge strings make, as it is). Every block written goes through here.
fn stored<'l>(lines: impl IntoIterator<Item = &'l [u8]>) -> Vec<u8> {
    let mut plain = Vec::new();
    for line in lines {
        plain.extend_from_slice(line);
        plain.push(b'\n');
    }
    if plain.len() > MAX_BLOCK {
        return plain;
    }
    let len = plain.len() as u32; // at most MAX_BLOCK
    let mut out = vec![0; LZ4_HEADER + lz4_flex::block::get_maximum_output_size(plain.len())];
    out[0] = LZ4;
    out[1..LZ4_HEADER].copy_from_slice(&len.to_le_bytes());
    let n = lz4_flex::block::compress_into(&plain, &mut out[LZ4_HEADER..])
        .expect("the buffer is sized by get_maximum_output_size");
    out.truncate(LZ4_HEADER + n);
    out
}

/// A stored value's lines: decompressed when the value is a compressed
/// block, as it is otherwise; `None` when it does not decompress.
fn decoded(value: &[u8]) -> Option<Cow<'_, [u8]>> {
    let Some((&LZ4, rest)) = value.split_first() else {
        return Some(Cow::Borrowed(value));
    };
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_BLOCK {
        return None;
    }
    let plain = lz4_flex::block::decompress(&rest[4..], len).ok()?;
    (plain.len() == len).then_some(Cow::Owned(plain))
}

/// The rows in a stored value once [`decoded`]: a block's lines, or a
/// value of one row. (`serde_json` escapes every newline inside a string,
/// so a row's JSON has none.)
pub fn lines(plain: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    plain.split(|b| *b == b'\n').filter(|l| !l.is_empty())
}

/// The error for a stored block that does not decompress.
fn corrupt() -> sled::Error {
    sled::Error::Unsupported("a usage-log block in the store does not decompress".into())
}

/// The id of a stored row: read from its first member (`serde_json`
/// writes a row's fields in order, `id` first); decoded otherwise.
pub fn id_of(line: &[u8]) -> Option<u64> {
    let fast = line.strip_prefix(b"{\"id\":").and_then(|rest| {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    });
    fast.or_else(|| {
        #[derive(serde::Deserialize)]
        struct Id {
            id: u64,
        }
        serde_json::from_slice::<Id>(line).ok().map(|r| r.id)
    })
}

/// A row to store, with its JSON when the journal already made it.
pub type NewRow<'a> = (&'a LogRow, Option<&'a RowJson>);

/// `rows` (all of one block) merged into the block's stored value:
/// the new value, and the rows it did not hold yet (a row written again,
/// as in a replay, is kept once).
pub fn merge<'a>(existing: Option<&[u8]>, rows: &[NewRow<'a>]) -> anyhow::Result<(Vec<u8>, Vec<&'a LogRow>)> {
    let existing = existing.map(|v| decoded(v).ok_or_else(corrupt)).transpose()?;
    let mut all: Vec<(u64, Cow<'_, [u8]>)> =
        existing.iter().flat_map(|v| lines(v)).map(|l| (id_of(l).unwrap_or(0), l.into())).collect();
    let mut fresh = Vec::with_capacity(rows.len());
    for &(row, json) in rows {
        if all.iter().any(|(id, _)| *id == row.id) {
            continue;
        }
        all.push((row.id, RowJson::or_serialized(json, row)?));
        fresh.push(row);
    }
    all.sort_by_key(|(id, _)| *id);
    Ok((stored(all.iter().map(|(_, line)| &line[..])), fresh))
}

/// `rows` grouped by the block each goes to, blocks in key order.
pub fn by_block<'a>(rows: impl IntoIterator<Item = NewRow<'a>>) -> BTreeMap<[u8; 9], Vec<NewRow<'a>>> {
    let mut blocks: BTreeMap<[u8; 9], Vec<NewRow<'a>>> = BTreeMap::new();
    for row in rows {
        blocks.entry(key(row.0.id)).or_default().push(row);
    }
    blocks
}

/// `rows` written into their blocks, merged with what the tree holds (a
/// store being seeded; the billing writer does the same in its
/// transaction).
pub fn insert(tree: &sled::Tree, rows: &[LogRow]) -> anyhow::Result<()> {
    let mut batch = sled::Batch::default();
    for (k, group) in by_block(rows.iter().map(|r| (r, None))) {
        let (value, _) = merge(tree.get(k)?.as_deref(), &group)?;
        batch.insert(&k[..], value);
    }
    Ok(tree.apply_batch(batch)?)
}

/// One stored row: its value and where in it the row's JSON is.
#[derive(Clone)]
pub struct Raw {
    /// The stored value, or its lines decompressed (shared by its rows).
    value: bytes::Bytes,
    span: Range<usize>,
}

impl Raw {
    /// The row's JSON.
    pub fn bytes(&self) -> &[u8] {
        &self.value[self.span.clone()]
    }
}

/// The rows of one stored value whose ids are in `ids`, in id order
/// (`None` when the value does not decompress).
fn spans(value: sled::IVec, ids: Range<u64>) -> Option<Vec<Raw>> {
    let value = match decoded(&value)? {
        Cow::Borrowed(_) => bytes::Bytes::from_owner(value),
        Cow::Owned(plain) => bytes::Bytes::from(plain),
    };
    let base = value.as_ptr() as usize;
    let spans: Vec<Range<usize>> = lines(&value)
        .filter(|l| id_of(l).is_some_and(|id| ids.contains(&id)))
        .map(|l| {
            let start = l.as_ptr() as usize - base;
            start..start + l.len()
        })
        .collect();
    Some(spans.into_iter().map(|span| Raw { value: value.clone(), span }).collect())
}

/// The rows with ids in `ids`, newest first.
pub fn newest_first(tree: &sled::Tree, ids: Range<u64>) -> impl Iterator<Item = Raw> + '_ {
    let (from, to) = (ids.start, ids.end.min(ID_LIMIT));
    let blocks = (from < to).then(|| tree.range(key(from)..=key(to - 1)).rev());
    let single = (from < to).then(|| tree.range(from.to_be_bytes()..to.to_be_bytes()).rev());
    blocks
        .into_iter()
        .flatten()
        .chain(single.into_iter().flatten())
        .filter_map(Result::ok)
        .flat_map(move |(_, value)| spans(value, from..to).unwrap_or_default().into_iter().rev())
}

/// Every row, oldest first (and what failed to read).
pub fn oldest_first(tree: &sled::Tree) -> impl Iterator<Item = sled::Result<Raw>> + '_ {
    tree.iter().flat_map(|item| match item {
        Ok((_, value)) => match spans(value, 0..u64::MAX) {
            Some(rows) => rows.into_iter().map(Ok).collect(),
            None => vec![Err(corrupt())],
        },
        Err(error) => vec![Err(error)],
    })
}

/// Delete the rows, oldest first, as long as `old` says so of them;
/// returns how many went (a block partly old keeps its other rows).
pub fn remove_while(tree: &sled::Tree, old: impl Fn(&[u8]) -> bool) -> anyhow::Result<usize> {
    let mut n = 0;
    for item in tree.iter() {
        let (k, value) = item?;
        let plain = decoded(&value).ok_or_else(corrupt)?;
        let rows: Vec<&[u8]> = lines(&plain).collect();
        let gone = rows.iter().take_while(|l| old(l)).count();
        n += gone;
        if gone == rows.len() {
            tree.remove(k)?;
            continue;
        }
        if gone > 0 {
            tree.insert(k, stored(rows[gone..].iter().copied()))?;
        }
        break;
    }
    Ok(n)
}

/// The lowest row id the tree holds.
pub fn first_id(tree: &sled::Tree) -> anyhow::Result<Option<u64>> {
    let Some((_, value)) = tree.first()? else {
        return Ok(None);
    };
    let plain = decoded(&value).ok_or_else(corrupt)?;
    Ok(lines(&plain).next().and_then(id_of))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64) -> LogRow {
        LogRow { id, at_ms: 1_000 * id, model: "m\nline".into(), ..LogRow::default() }
    }

    fn ids(raws: impl Iterator<Item = Raw>) -> Vec<u64> {
        raws.map(|r| id_of(r.bytes()).expect("id")).collect()
    }

    fn all(tree: &sled::Tree) -> Vec<u64> {
        ids(oldest_first(tree).map(|r| r.expect("read")))
    }

    #[test]
    fn rows_of_one_key_each_and_blocks_read_as_one_log_in_id_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = sled::open(dir.path()).expect("sled").open_tree("logs").expect("tree");
        // A store from before blocks: ids 1..=20, one per key.
        for id in 1..=20u64 {
            tree.insert(id.to_be_bytes(), serde_json::to_vec(&row(id)).expect("json")).expect("insert");
        }
        // New rows arrive out of order, one written twice.
        let new: Vec<LogRow> = [38, 21, 35, 22].into_iter().map(row).collect();
        for r in &new {
            let k = key(r.id);
            let (value, fresh) = merge(tree.get(k).expect("get").as_deref(), &[(r, None), (r, None)]).expect("merge");
            assert_eq!(fresh.len(), 1, "a row given twice is stored once");
            tree.insert(k, value).expect("insert");
        }
        let (_, fresh) = merge(tree.get(key(21)).expect("get").as_deref(), &[(&new[1], None)]).expect("merge");
        assert!(fresh.is_empty(), "a replayed row is not new");
        assert_eq!(tree.len(), 20 + 2, "21 and 22 share a block, 35 and 38 another");

        assert_eq!(all(&tree), (1..=22).chain([35, 38]).collect::<Vec<_>>());
        assert_eq!(ids(newest_first(&tree, 18..36)), vec![35, 22, 21, 20, 19, 18]);
        assert_eq!(ids(newest_first(&tree, 0..u64::MAX)).len(), 24);
        assert!(ids(newest_first(&tree, 39..u64::MAX)).is_empty());
        let decoded: LogRow = serde_json::from_slice(newest_first(&tree, 0..u64::MAX).next().expect("row").bytes())
            .expect("a stored row decodes");
        assert_eq!(decoded, row(38), "newlines inside strings are escaped");

        // Deleting the oldest: whole keys, then part of a block.
        let old = |l: &[u8]| id_of(l).is_some_and(|id| id < 22);
        assert_eq!(remove_while(&tree, old).expect("remove"), 21);
        assert_eq!(all(&tree), vec![22, 35, 38]);
        assert_eq!(first_id(&tree).expect("first"), Some(22));
    }

    #[test]
    fn blocks_are_stored_compressed_and_plain_blocks_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = sled::open(dir.path()).expect("sled").open_tree("logs").expect("tree");
        // A block written before compression: plain lines under a block key.
        let plain: Vec<u8> = [1u64, 2]
            .iter()
            .flat_map(|id| serde_json::to_vec(&row(*id)).expect("json").into_iter().chain([b'\n']))
            .collect();
        tree.insert(key(1), plain.clone()).expect("insert");
        assert_eq!(all(&tree), vec![1, 2]);

        // Writing to it again stores the whole block compressed.
        let third = row(3);
        let (value, fresh) = merge(tree.get(key(3)).expect("get").as_deref(), &[(&third, None)]).expect("merge");
        assert_eq!(fresh.len(), 1);
        assert_eq!(value[0], LZ4, "a written block is compressed");
        assert!(value.len() < plain.len(), "three rows compressed take less than two plain ({} bytes)", value.len());
        tree.insert(key(3), value).expect("insert");
        assert_eq!(all(&tree), vec![1, 2, 3]);
        assert_eq!(first_id(&tree).expect("first"), Some(1));
        let newest: LogRow =
            serde_json::from_slice(newest_first(&tree, 0..u64::MAX).next().expect("row").bytes()).expect("decodes");
        assert_eq!(newest, row(3));

        // A block that does not decompress is an error, never rows.
        tree.insert(key(9), vec![LZ4, 200, 0, 0, 0, 1, 2, 3]).expect("insert");
        assert!(oldest_first(&tree).any(|r| r.is_err()), "reading every row reports it");
        assert_eq!(ids(newest_first(&tree, 0..u64::MAX)), vec![3, 2, 1], "a query skips it");
        assert!(
            merge(tree.get(key(9)).expect("get").as_deref(), &[(&row(9), None)]).is_err(),
            "nothing is written over it"
        );
        // A corrupt length is refused before anything is allocated for it.
        let mut huge = vec![LZ4];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 16]);
        assert!(decoded(&huge).is_none());
        // A block that large is stored as it is, and read back.
        let big = LogRow { id: 40, model: "m".repeat(MAX_BLOCK), ..LogRow::default() };
        let (value, _) = merge(None, &[(&big, None)]).expect("merge");
        assert_eq!(value[0], b'{', "stored plain");
        assert_eq!(lines(&decoded(&value).expect("plain")).count(), 1);
    }

    #[test]
    fn ids_are_read_without_decoding_and_with() {
        assert_eq!(id_of(br#"{"id":1234,"at_ms":5}"#), Some(1234));
        assert_eq!(id_of(br#"{"at_ms":5,"id":77}"#), Some(77));
        assert_eq!(id_of(b"garbage"), None);
    }
}
