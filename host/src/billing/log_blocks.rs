//! How usage rows sit in the `logs` tree: in blocks of consecutive row
//! ids, each block the JSON of its rows, one per line, in id order. sled
//! keeps tens of bytes in memory for every key of a tree whether or not its
//! page is cached, so a key per row made a node's memory grow with its usage
//! log for good (70 MB more for 1.7 million rows, at idle after a restart);
//! a key per block divides that by the block's size.
//!
//! Two sizes of block, told apart by the first byte of their key (then
//! the block number, big-endian):
//! - **wide** blocks of 32 rows (`C`), where a store puts every row from its
//!   [`Layout`]'s boundary on: all of them in a store made since;
//! - **narrow** blocks of 8 rows (`B`), which stores written before wide
//!   blocks hold below that boundary (and keep: rows are not moved).
//!
//! Stores from before blocks hold one row per key (the id, big-endian:
//! keys below any block's, as every row id is below `B`'s first byte).
//! All three are read the same way — such a value is a block of one row —
//! and the kinds hold ids in increasing ranges, so the tree's key order is
//! the log's id order.
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

/// One size of block: the first byte of its keys and its rows per block
/// (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kind {
    tag: u8,
    shift: u32,
}

/// Blocks of 8 rows: what stores from before wide blocks hold.
const NARROW: Kind = Kind { tag: b'B', shift: 3 };
/// Blocks of 32 rows. A sled leaf holds 16 keys whatever their size, so
/// wider blocks mean fewer leaves and less of sled's per-page memory; past
/// 32 the bigger values in the leaves being written cost as much as that
/// saves (`docs/performance.md`, twentieth session).
const WIDE: Kind = Kind { tag: b'C', shift: 5 };
/// Row ids are below this (the smallest id whose key would start with the
/// first block tag); so are the keys of rows stored one per key.
const ID_LIMIT: u64 = (NARROW.tag as u64) << 56;

impl Kind {
    /// The key of this kind's block that holds row `id`.
    fn key(self, id: u64) -> [u8; 9] {
        let mut k = [self.tag; 9];
        k[1..].copy_from_slice(&(id >> self.shift).to_be_bytes());
        k
    }

    /// The keys of this kind's blocks that may hold ids `from..to` (`from < to`).
    fn keys(self, from: u64, to: u64) -> std::ops::RangeInclusive<[u8; 9]> {
        self.key(from)..=self.key(to - 1)
    }
}

/// Where a store's `billing_state` tree records its [`Layout`]'s boundary.
pub const WIDE_FROM: &[u8] = b"log_wide_from";

/// Which block each row of one store goes to: rows from `wide_from` on in
/// wide blocks, rows below it (only ever a store's older rows) in narrow
/// ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    wide_from: u64,
}

impl Layout {
    /// Every row in wide blocks, as in a store whose log was empty when
    /// its layout was settled.
    pub const WIDE: Layout = Layout { wide_from: 0 };
    /// Every row in narrow blocks: a store whose layout is not settled yet
    /// (one written before wide blocks).
    const NARROW: Layout = Layout { wide_from: u64::MAX };

    /// The layout recorded in `state` (narrow blocks only, until
    /// [`settle`](Self::settle) records one).
    pub fn read(state: &sled::Tree) -> sled::Result<Self> {
        Ok(Self::recorded(state)?.unwrap_or(Self::NARROW))
    }

    /// The layout `state` records, if any (narrow blocks only for a
    /// record that is not an id).
    fn recorded(state: &sled::Tree) -> sled::Result<Option<Self>> {
        Ok(state.get(WIDE_FROM)?.map(|v| match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(id) => Layout { wide_from: u64::from_be_bytes(id) },
            Err(_) => Self::NARROW,
        }))
    }

    /// The layout recorded in `state`, recording one first if there is
    /// none: every row in wide blocks when the log is empty; otherwise wide
    /// from `next_id` on, an id above every row id given out so far. Called
    /// by the store's migration to schema 5 (and when one is made), before
    /// any row of the run is numbered.
    pub fn settle(
        state: &sled::Tree,
        logs: &sled::Tree,
        next_id: impl FnOnce() -> anyhow::Result<u64>,
    ) -> anyhow::Result<Self> {
        if let Some(layout) = Self::recorded(state)? {
            return Ok(layout);
        }
        let wide_from = if logs.is_empty() { 0 } else { next_id()? };
        state.insert(WIDE_FROM, &wide_from.to_be_bytes())?;
        state.flush()?;
        Ok(Layout { wide_from })
    }

    fn kind(self, id: u64) -> Kind {
        if id >= self.wide_from { WIDE } else { NARROW }
    }

    /// The key of the block holding row `id`.
    fn key(self, id: u64) -> [u8; 9] {
        self.kind(id).key(id)
    }

    /// `rows` grouped by the block each goes to, blocks in key order.
    pub fn by_block<'a>(self, rows: impl IntoIterator<Item = NewRow<'a>>) -> BTreeMap<[u8; 9], Vec<NewRow<'a>>> {
        let mut blocks: BTreeMap<[u8; 9], Vec<NewRow<'a>>> = BTreeMap::new();
        for row in rows {
            blocks.entry(self.key(row.0.id)).or_default().push(row);
        }
        blocks
    }

    /// `rows` written into their blocks, merged with what the tree holds
    /// (a store being seeded; the billing writer does the same in its
    /// transaction).
    pub fn insert(self, tree: &sled::Tree, rows: &[LogRow]) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for (k, group) in self.by_block(rows.iter().map(|r| (r, None))) {
            let (value, _) = merge(tree.get(k)?.as_deref(), &group)?;
            batch.insert(&k[..], value);
        }
        Ok(tree.apply_batch(batch)?)
    }
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
    let wide = (from < to).then(|| tree.range(WIDE.keys(from, to)).rev());
    let narrow = (from < to).then(|| tree.range(NARROW.keys(from, to)).rev());
    let single = (from < to).then(|| tree.range(from.to_be_bytes()..to.to_be_bytes()).rev());
    wide.into_iter()
        .flatten()
        .chain(narrow.into_iter().flatten())
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
    fn rows_of_one_key_each_narrow_and_wide_blocks_read_as_one_log_in_id_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = sled::open(dir.path()).expect("sled").open_tree("logs").expect("tree");
        // A store from before blocks: ids 1..=20, one per key.
        for id in 1..=20u64 {
            tree.insert(id.to_be_bytes(), serde_json::to_vec(&row(id)).expect("json")).expect("insert");
        }
        // Then narrow blocks, then wide ones from 23 on: the narrow block
        // of 16..=23 and the wide one of 0..=31 cover the same ids.
        let layout = Layout { wide_from: 23 };
        // New rows arrive out of order, one written twice.
        let new: Vec<LogRow> = [38, 21, 35, 24, 22, 30].into_iter().map(row).collect();
        for r in &new {
            let k = layout.key(r.id);
            let (value, fresh) = merge(tree.get(k).expect("get").as_deref(), &[(r, None), (r, None)]).expect("merge");
            assert_eq!(fresh.len(), 1, "a row given twice is stored once");
            tree.insert(k, value).expect("insert");
        }
        let (_, fresh) = merge(tree.get(layout.key(21)).expect("get").as_deref(), &[(&new[1], None)]).expect("merge");
        assert!(fresh.is_empty(), "a replayed row is not new");
        assert_eq!(tree.len(), 20 + 3, "21 and 22 share a narrow block, 24 and 30 a wide one, 35 and 38 another");

        assert_eq!(all(&tree), (1..=22).chain([24, 30, 35, 38]).collect::<Vec<_>>());
        assert_eq!(ids(newest_first(&tree, 18..36)), vec![35, 30, 24, 22, 21, 20, 19, 18]);
        assert_eq!(ids(newest_first(&tree, 22..25)), vec![24, 22]);
        assert_eq!(ids(newest_first(&tree, 0..u64::MAX)).len(), 26);
        assert!(ids(newest_first(&tree, 39..u64::MAX)).is_empty());
        let decoded: LogRow = serde_json::from_slice(newest_first(&tree, 0..u64::MAX).next().expect("row").bytes())
            .expect("a stored row decodes");
        assert_eq!(decoded, row(38), "newlines inside strings are escaped");

        // Deleting the oldest: whole keys, then part of a block.
        let old = |l: &[u8]| id_of(l).is_some_and(|id| id < 30);
        assert_eq!(remove_while(&tree, old).expect("remove"), 23);
        assert_eq!(all(&tree), vec![30, 35, 38]);
        assert_eq!(first_id(&tree).expect("first"), Some(30));
    }

    #[test]
    fn a_store_settles_its_layout_once_wide_from_its_next_row_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        let (state, logs) = (db.open_tree("state").expect("tree"), db.open_tree("logs").expect("tree"));
        assert_eq!(Layout::read(&state).expect("read"), Layout::NARROW, "unsettled: narrow blocks only");
        let no_id = || -> anyhow::Result<u64> { panic!("an empty log needs no boundary") };
        assert_eq!(Layout::settle(&state, &logs, no_id).expect("settle"), Layout::WIDE, "an empty log: all wide");

        // A store with rows from before: wide from the next id on.
        let (state, logs) = (db.open_tree("state2").expect("tree"), db.open_tree("logs2").expect("tree"));
        Layout::NARROW.insert(&logs, &[row(3), row(9)]).expect("insert");
        let layout = Layout::settle(&state, &logs, || Ok(12)).expect("settle");
        assert_eq!(layout, Layout { wide_from: 12 });
        assert_eq!((layout.key(11)[0], layout.key(12)[0]), (NARROW.tag, WIDE.tag));
        // Settled once: the boundary stays where it was recorded.
        assert_eq!(Layout::settle(&state, &logs, || Ok(99)).expect("settle"), layout);
        assert_eq!(Layout::read(&state).expect("read"), layout);
        layout.insert(&logs, &[row(40), row(12)]).expect("insert");
        assert_eq!(all(&logs), vec![3, 9, 12, 40]);
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
        tree.insert(NARROW.key(1), plain.clone()).expect("insert");
        assert_eq!(all(&tree), vec![1, 2]);

        // Writing to it again stores the whole block compressed.
        let third = row(3);
        let (value, fresh) = merge(tree.get(NARROW.key(3)).expect("get").as_deref(), &[(&third, None)]).expect("merge");
        assert_eq!(fresh.len(), 1);
        assert_eq!(value[0], LZ4, "a written block is compressed");
        assert!(value.len() < plain.len(), "three rows compressed take less than two plain ({} bytes)", value.len());
        tree.insert(NARROW.key(3), value).expect("insert");
        assert_eq!(all(&tree), vec![1, 2, 3]);
        assert_eq!(first_id(&tree).expect("first"), Some(1));
        let newest: LogRow =
            serde_json::from_slice(newest_first(&tree, 0..u64::MAX).next().expect("row").bytes()).expect("decodes");
        assert_eq!(newest, row(3));

        // A block that does not decompress is an error, never rows.
        tree.insert(NARROW.key(9), vec![LZ4, 200, 0, 0, 0, 1, 2, 3]).expect("insert");
        assert!(oldest_first(&tree).any(|r| r.is_err()), "reading every row reports it");
        assert_eq!(ids(newest_first(&tree, 0..u64::MAX)), vec![3, 2, 1], "a query skips it");
        assert!(
            merge(tree.get(NARROW.key(9)).expect("get").as_deref(), &[(&row(9), None)]).is_err(),
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
