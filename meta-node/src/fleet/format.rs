//! Listing rows as JSON and tab-separated text, written straight into a chunk's buffer.

use super::*;

/// A row with its own strings (the tests' reference for summaries).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnedRow {
    pub hostname: String,
    pub ip: String,
    pub version: String,
    pub status: String,
    pub run_state: String,
    pub desired_version: String,
    pub desired_cmd: String,
    pub last_seen: u32,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    #[serde(default)]
    pub relay: String,
}

#[cfg(test)]
impl OwnedRow {
    pub fn from_row(row: &Row<'_>) -> OwnedRow {
        OwnedRow {
            hostname: row.hostname.to_owned(),
            ip: row.ip.to_string(),
            version: row.version.to_owned(),
            status: row.status.to_owned(),
            run_state: row.run_state.to_owned(),
            desired_version: row.desired.map_or(String::new(), |d| d.version.to_owned()),
            desired_cmd: row.desired.map_or(String::new(), |d| d.cmd.to_owned()),
            last_seen: row.last_seen,
            state: row.state.as_str().to_owned(),
            last_error: row.last_error.map(str::to_owned),
            pinned: row.pinned.map(str::to_owned),
            relay: row.relay.to_owned(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RowJson<'a> {
    pub(super) hostname: &'a str,
    pub(super) ip: String,
    pub(super) version: &'a str,
    pub(super) status: &'a str,
    pub(super) desired_version: &'a str,
    pub(super) desired_cmd: &'a str,
    pub(super) last_seen: u32,
    pub(super) state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) last_error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) pinned: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(super) relay: &'a str,
}

/// Appends a row as one JSON object with a comma before it: streams of rows from several
/// sources concatenate, and the writer of the array drops the very first comma.
pub fn write_json_row(row: &Row<'_>, buf: &mut Vec<u8>) {
    buf.push(b',');
    let r = RowJson {
        hostname: row.hostname,
        ip: row.ip.to_string(),
        version: row.version,
        status: row.status,
        desired_version: row.desired.map_or("", |d| d.version),
        desired_cmd: row.desired.map_or("", |d| d.cmd),
        last_seen: row.last_seen,
        state: row.state.as_str(),
        last_error: row.last_error,
        pinned: row.pinned,
        relay: row.relay,
    };
    // Writing into a Vec cannot fail, and the row has no map with non-string keys.
    let _ = serde_json::to_writer(&mut *buf, &r);
}

/// The header line of the text listing.
pub const TEXT_HEADER: &str = "#hostname\tip\tversion\tstatus\tdesired\tstate\tlast_seen\tlast_error\n";

pub(super) fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) { s.replace(char::is_control, " ").into() } else { s.into() }
}

/// Appends a row as one tab-separated line.
pub fn write_text_row(row: &Row<'_>, buf: &mut Vec<u8>) {
    let status = if row.status.is_empty() { row.run_state } else { row.status };
    let _ = writeln!(
        buf,
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        row.hostname,
        if matches!(row.ip, crate::store::IpText::Str("")) { "-".to_string() } else { row.ip.to_string() },
        if row.version.is_empty() { "-" } else { row.version },
        clean(status),
        row.desired.map_or("-", |d| d.version),
        row.state.as_str(),
        row.last_seen,
        clean(row.last_error.unwrap_or("-")),
    );
}
