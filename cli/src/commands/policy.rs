//! `pgquorum policy get|set`.

use serde_json::json;

use super::cluster::policy_json;
use super::{actor, consistency, parse_settings, Ctx};
use crate::error::{Error, Result};
use crate::output::{emit, table};
use pgquorum_client::pb;

pub async fn get(ctx: &Ctx, cluster: &str, local: bool) -> Result<()> {
    let request = pb::GetPolicyRequest {
        cluster: cluster.to_string(),
        consistency: consistency(local),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.get_policy(request).await }
        })
        .await?;
    print(ctx, &reply);
    Ok(())
}

pub async fn set(ctx: &Ctx, cluster: &str, settings: &[String]) -> Result<()> {
    if settings.is_empty() {
        return Err(Error::Usage(
            "nothing to set: give one or more field=value".into(),
        ));
    }
    let request = pb::SetPolicyRequest {
        cluster: cluster.to_string(),
        settings: parse_settings(settings)?,
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.set_policy(request).await }
        })
        .await?;
    print(ctx, &reply);
    Ok(())
}

fn print(ctx: &Ctx, reply: &pb::PolicyReply) {
    let policy = reply.policy.clone().unwrap_or_default();
    let value = json!({ "cluster": reply.cluster, "policy": policy_json(&policy) });
    emit(ctx.json, &value, || {
        let mut rows: Vec<Vec<String>> = match policy_json(&policy) {
            serde_json::Value::Object(m) => m
                .into_iter()
                .flat_map(|(k, v)| match v {
                    serde_json::Value::Object(inner) => inner
                        .into_iter()
                        .map(|(ik, iv)| vec![format!("{k}.{ik}"), iv.to_string()])
                        .collect(),
                    serde_json::Value::String(s) => vec![vec![k, s]],
                    serde_json::Value::Array(a) => {
                        vec![vec![
                            k,
                            a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","),
                        ]]
                    }
                    other => vec![vec![k, other.to_string()]],
                })
                .collect(),
            _ => Vec::new(),
        };
        rows.sort();
        format!(
            "policy of cluster {}\n{}",
            reply.cluster,
            table(&["FIELD", "VALUE"], rows)
        )
    });
}
