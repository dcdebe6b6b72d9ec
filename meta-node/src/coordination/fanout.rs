//! One step of a cluster-wide change, posted to every node at once.

use crate::Node;

/// Why one node's step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The node did not answer at all (down, or not listening): an apply goes on without it,
    /// and it takes the new generation from a peer once back.
    #[error("no answer: {0}")]
    NoAnswer(String),
    /// The node answered and refused, or answered something that is not its step's reply, or
    /// another node answered on its address.
    #[error("{0}")]
    Refused(String),
}

/// POSTs one step of a cluster-wide change to every `(id, base)` at once, with the token (and
/// `headers`): each answer parsed as `T`, or the node's `errorMessage`; an answer from another
/// node than the one expected on that address is an error too.
pub async fn post_each<T: serde::de::DeserializeOwned>(
    node: &Node,
    client: &reqwest::Client,
    targets: &[(String, String)],
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Vec<Result<T, StepError>> {
    futures_util::future::join_all(targets.iter().map(|(id, base)| {
        let mut req = client.post(format!("{base}{path}")).timeout(timeout).body(body.to_owned());
        if let Some(token) = node.peer_token() {
            req = req.bearer_auth(token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move {
            let r = req.send().await.map_err(|e| StepError::NoAnswer(e.to_string()))?;
            let ok = r.status().is_success();
            let v: serde_json::Value = r.json().await.map_err(|e| StepError::Refused(format!("bad answer: {e}")))?;
            judge(id, ok, v)
        }
    }))
    .await
}

/// One node's answer: refused unless a success that names the node expected and parses as `T`.
fn judge<T: serde::de::DeserializeOwned>(id: &str, ok: bool, v: serde_json::Value) -> Result<T, StepError> {
    if !ok {
        return Err(StepError::Refused(v["errorMessage"].as_str().unwrap_or("refused").to_owned()));
    }
    if v["id"].as_str() != Some(id) {
        return Err(StepError::Refused(format!("node {} answered on {id}'s address", v["id"])));
    }
    serde_json::from_value(v).map_err(|e| StepError::Refused(format!("bad answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Step {
        id: String,
        generation: u64,
    }

    #[test]
    fn an_answer_counts_only_from_the_node_expected_on_that_address() {
        let ok: Result<Step, _> = judge("meta-1", true, serde_json::json!({"id": "meta-1", "generation": 3}));
        assert_eq!(ok, Ok(Step { id: "meta-1".into(), generation: 3 }));
        let other: Result<Step, _> = judge("meta-1", true, serde_json::json!({"id": "meta-2", "generation": 3}));
        assert_eq!(other, Err(StepError::Refused("node \"meta-2\" answered on meta-1's address".into())));
        let anonymous: Result<Step, _> = judge("meta-1", true, serde_json::json!({"generation": 3}));
        assert!(matches!(anonymous, Err(StepError::Refused(m)) if m.contains("answered on meta-1's address")));
    }

    #[test]
    fn a_refusal_carries_the_nodes_message_and_a_bad_shape_is_refused() {
        let refused: Result<Step, _> = judge("meta-1", false, serde_json::json!({"errorMessage": "signed config refused"}));
        assert_eq!(refused, Err(StepError::Refused("signed config refused".into())));
        let bare: Result<Step, _> = judge("meta-1", false, serde_json::json!({}));
        assert_eq!(bare, Err(StepError::Refused("refused".into())));
        let shape: Result<Step, _> = judge("meta-1", true, serde_json::json!({"id": "meta-1", "generation": "x"}));
        assert!(matches!(shape, Err(StepError::Refused(m)) if m.starts_with("bad answer: ")));
        assert_eq!(StepError::NoAnswer("connection refused".into()).to_string(), "no answer: connection refused");
    }
}
