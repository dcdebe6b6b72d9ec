//! The replies of the meta nodes' cluster-wide procedures, typed once for the servers that
//! write them and the clients (`opsctl`, `ops-bench`, the tests) that read them.
//!
//! Field names on the wire are camelCase. Every reply round-trips through serde unchanged
//! (tests below); a field a client does not know is ignored, so a newer node's reply still
//! reads.
//!
//! "Generation" means one thing per type here: [`ConfigStep::generation`] and
//! [`ApplyReply::generation`] are the *config generation* (`meta_node::generations`: the
//! number each apply writes, the signed file's version when configs are signed);
//! [`ChangeReply::generation`] and [`StepReply::generation`] are the *map generation* (the
//! cluster map's, one above the highest any node held, or the signed map's version).

use serde::{Deserialize, Serialize};

/// One node's answer to a config step (`POST /internal/config/{check,write}`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStep {
    pub id: String,
    pub hash: String,
    /// The config generation the node serves after the step.
    pub generation: u64,
}

/// One node's part in a config apply, as the coordinator reports it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyNode {
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub hash: String,
    pub generation: u64,
}

/// The reply of `POST /config/apply` and `POST /config/rollback`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReply {
    pub hash: String,
    pub previous_hash: String,
    /// The config generation written (0 when refused).
    pub generation: u64,
    pub changed: bool,
    pub error_message: String,
    /// Nodes that did not answer: they take the new generation from a peer once back.
    pub missing_nodes: Vec<String>,
    pub nodes: Vec<ApplyNode>,
}

/// What a node's membership step answered (`POST /internal/cluster/{step}`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReply {
    pub id: String,
    pub hash: String,
    /// Prepare: hosts sent to their new owner.
    #[serde(default)]
    pub moved: usize,
    /// Commit: hosts whose `owned` flag changed.
    #[serde(default)]
    pub remarked: usize,
    /// The node already served this map.
    #[serde(default)]
    pub unchanged: bool,
    /// Prepare: the map generation the node serves; commit: of the new map.
    #[serde(default)]
    pub generation: u64,
}

/// One node's part in a membership change, as the coordinator reports it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeNode {
    pub id: String,
    pub url: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub moved: usize,
    pub remarked: usize,
}

/// The reply of `GET /cluster/reload?all=1`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeReply {
    /// The node that coordinated.
    pub node: String,
    pub hash: String,
    pub previous_hash: String,
    pub changed: bool,
    /// The map generation: one above the highest any node held at prepare.
    pub generation: u64,
    /// The step that failed, when the change was refused (`prepare`, `commit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<String>,
    pub error_message: String,
    pub nodes: Vec<ChangeNode>,
}

/// A refusal's body, from any route: `{"errorMessage": "..."}`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    pub error_message: String,
}

/// One config version a node keeps (`GET /config/history`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptVersion {
    /// Its config generation.
    pub generation: u64,
    pub hash: String,
    pub bytes: u64,
    pub signed: bool,
}

/// The reply of `GET /config/history`: the config generation served and the versions kept,
/// newest first.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct History {
    pub id: String,
    pub generation: u64,
    pub hash: String,
    pub versions: Vec<KeptVersion>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) -> serde_json::Value {
        let json = serde_json::to_value(value).unwrap();
        let back: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&back, value);
        json
    }

    #[test]
    fn an_apply_reply_round_trips_in_camel_case() {
        let reply = ApplyReply {
            hash: "h2".into(),
            previous_hash: "h1".into(),
            generation: 4,
            changed: true,
            error_message: "applied; meta-3 did not answer".into(),
            missing_nodes: vec!["meta-3".into()],
            nodes: vec![
                ApplyNode { id: "meta-1".into(), ok: true, error: None, hash: "h2".into(), generation: 4 },
                ApplyNode { id: "meta-3".into(), ok: false, error: Some("no answer: refused".into()), ..ApplyNode::default() },
            ],
        };
        let json = round_trip(&reply);
        assert_eq!(json["previousHash"], "h1");
        assert_eq!(json["missingNodes"][0], "meta-3");
        assert!(json["nodes"][0].get("error").is_none(), "no error field on a node that is ok");
        round_trip(&ConfigStep { id: "meta-1".into(), hash: "h".into(), generation: 9 });
        let history = History {
            id: "meta-1".into(),
            generation: 9,
            hash: "h".into(),
            versions: vec![KeptVersion { generation: 9, hash: "h".into(), bytes: 120, signed: true }],
        };
        assert_eq!(round_trip(&history)["versions"][0]["signed"], true);
        let refusal: ErrorReply = serde_json::from_str(r#"{"errorMessage":"diff again"}"#).unwrap();
        assert_eq!(refusal.error_message, "diff again");
    }

    #[test]
    fn a_change_reply_round_trips_and_reads_a_step_without_its_optional_fields() {
        let reply = ChangeReply {
            node: "meta-1".into(),
            hash: "m2".into(),
            previous_hash: "m1".into(),
            changed: false,
            generation: 7,
            failed_at: Some("prepare".into()),
            error_message: "nothing changed: meta-2: refused".into(),
            nodes: vec![ChangeNode {
                id: "meta-2".into(),
                url: "http://x".into(),
                ok: false,
                error: Some("refused".into()),
                moved: 0,
                remarked: 0,
            }],
        };
        let json = round_trip(&reply);
        assert_eq!(json["failedAt"], "prepare");
        let step: StepReply = serde_json::from_value(serde_json::json!({"id": "meta-2", "hash": "m2"})).unwrap();
        assert_eq!(step, StepReply { id: "meta-2".into(), hash: "m2".into(), ..StepReply::default() });
        round_trip(&StepReply { id: "a".into(), hash: "b".into(), moved: 3, remarked: 2, unchanged: true, generation: 5 });
    }
}
