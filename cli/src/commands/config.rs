//! `pgquorum config show|set|edit`: the cluster's Postgres parameters, kept in the
//! coordinators' replicated state (Patroni's dynamic configuration). Every agent
//! writes them to `pgquorum.cluster.conf` (the node's own settings win) and reloads;
//! a parameter that needs a restart shows as pending in `status` and here until
//! `pgquorum restart --pending`. A change is checked (names; what pgquorum manages is
//! refused), shown as a diff, and recorded in the history; what Postgres itself
//! refuses (a bad value) each node reports, and `set` waits to say so.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{actor, cluster, parse_settings, status, Ctx};
use crate::error::{Error, Result};
use crate::output::{emit, table};
use pgquorum_client::pb;

async fn name_of(ctx: &Ctx, cluster_name: &str) -> Result<String> {
    match cluster_name {
        "" => cluster::only_cluster(ctx).await,
        named => Ok(named.to_string()),
    }
}

/// `config show`.
pub async fn show(ctx: &Ctx, cluster_name: &str) -> Result<()> {
    let name = name_of(ctx, cluster_name).await?;
    let c = cluster::fetch(ctx, &name, false).await?;
    let s = status::fetch(ctx, &name).await?;
    let parameters: BTreeMap<&String, &String> = c.parameters.iter().collect();
    let value = json!({
        "cluster": c.name,
        "parameters": parameters,
        "parameters_version": c.parameters_version,
        "nodes": s.nodes.iter().map(|n| json!({
            "name": n.name,
            "parameters_version": n.parameters_version,
            "pending_restart": n.pending_restart_parameters,
            "parameter_errors": n.parameter_errors,
        })).collect::<Vec<_>>(),
    });
    emit(ctx.json, &value, || {
        let params = if parameters.is_empty() {
            "no cluster-wide parameters (`pgquorum config set NAME=VALUE`)".to_string()
        } else {
            table(
                &["PARAMETER", "VALUE"],
                parameters
                    .iter()
                    .map(|(k, v)| vec![k.to_string(), v.to_string()])
                    .collect(),
            )
        };
        format!(
            "cluster {} parameters (version {}):\n{params}\n{}",
            c.name,
            c.parameters_version,
            nodes_table(&s, c.parameters_version)
        )
    });
    Ok(())
}

fn nodes_table(s: &pb::StatusReply, version: u64) -> String {
    table(
        &["NODE", "APPLIED", "PENDING RESTART", "REFUSED BY POSTGRES"],
        s.nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    if n.parameters_version >= version {
                        "yes"
                    } else {
                        "not yet"
                    }
                    .to_string(),
                    n.pending_restart_parameters.join(", "),
                    n.parameter_errors.join("; "),
                ]
            })
            .collect(),
    )
}

/// `config set NAME=VALUE… [--unset NAME…]`.
pub async fn set(ctx: &Ctx, cluster_name: &str, args: &[String], unset: &[String]) -> Result<()> {
    let set: HashMap<String, String> = parse_settings(args)?;
    if set.is_empty() && unset.is_empty() {
        return Err(Error::Usage("give NAME=VALUE to set, or --unset NAME".into()));
    }
    let name = name_of(ctx, cluster_name).await?;
    apply(ctx, &name, set, unset.to_vec()).await
}

/// Sends a change, prints its diff, then waits (a few seconds) for the nodes to apply
/// it and says what waits for a restart and what Postgres refused.
async fn apply(ctx: &Ctx, name: &str, set: HashMap<String, String>, unset: Vec<String>) -> Result<()> {
    let before = cluster::fetch(ctx, name, false).await?;
    let request = pb::SetParametersRequest {
        cluster: name.to_string(),
        set,
        unset,
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.set_parameters(request).await }
        })
        .await?;
    let after = reply.cluster.unwrap_or_default();
    let diff = diff(&before.parameters, &after.parameters);
    if !ctx.json {
        println!("{}", diff.join("\n"));
    }
    let version = after.parameters_version;
    let started = Instant::now();
    let s = loop {
        let s = status::fetch(ctx, name).await?;
        let live = s.nodes.iter().filter(|n| n.health == "HEALTHY");
        let applied = live.clone().all(|n| n.parameters_version >= version);
        if applied || started.elapsed() >= Duration::from_secs(10) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let refused = refused(&s);
    let pending: Vec<&str> = s
        .nodes
        .iter()
        .filter(|n| n.pending_restart)
        .map(|n| n.name.as_str())
        .collect();
    let value = json!({
        "cluster": name, "changed": diff, "parameters_version": version,
        "pending_restart": pending, "refused": refused,
    });
    emit(ctx.json, &value, || {
        let mut out = nodes_table(&s, version);
        if !pending.is_empty() {
            out.push_str(&format!(
                "\npending restart on {}: `pgquorum restart --pending` restarts them, standbys first",
                pending.join(", ")
            ));
        }
        out
    });
    if !refused.is_empty() {
        // Not left in the cluster's parameters: a server restarted with them would not
        // start. Put back what was there.
        let mut set = HashMap::new();
        let mut unset = Vec::new();
        for (name, value) in &after.parameters {
            match before.parameters.get(name) {
                Some(old) if old != value => {
                    set.insert(name.clone(), old.clone());
                }
                None => unset.push(name.clone()),
                _ => {}
            }
        }
        let revert = pb::SetParametersRequest {
            cluster: name.to_string(),
            set,
            unset,
            actor: actor(),
        };
        let reverted = ctx
            .coordinators
            .call(|mut c| {
                let request = revert.clone();
                async move { c.set_parameters(request).await }
            })
            .await
            .map(|_| "the change is reverted".to_string())
            .unwrap_or_else(|e| format!("reverting it failed ({e}): revert it by hand"));
        return Err(Error::Outcome(format!(
            "Postgres refused: {}; {reverted}",
            refused.join(" | ")
        )));
    }
    Ok(())
}

/// What Postgres refused of the cluster's parameters, per node ("node: name: error").
pub fn refused(s: &pb::StatusReply) -> Vec<String> {
    s.nodes
        .iter()
        .filter(|n| !n.parameter_errors.is_empty())
        .map(|n| format!("{}: {}", n.name, n.parameter_errors.join("; ")))
        .collect()
}

/// `name: old -> new` for every parameter that differs.
fn diff(before: &HashMap<String, String>, after: &HashMap<String, String>) -> Vec<String> {
    let sorted = |m: &HashMap<String, String>| m.clone().into_iter().collect::<BTreeMap<_, _>>();
    pgquorum_coordinator::state::parameters::diff(&sorted(before), &sorted(after))
}

/// `config edit`: the parameters as TOML in `$EDITOR` (vi), then what changed is set.
pub async fn edit(ctx: &Ctx, cluster_name: &str) -> Result<()> {
    let name = name_of(ctx, cluster_name).await?;
    let before = cluster::fetch(ctx, &name, false).await?;
    let current: BTreeMap<String, String> = before.parameters.clone().into_iter().collect();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("{name}-parameters.toml"));
    let text = format!(
        "# Postgres parameters of cluster {name}, one `name = \"value\"` a line; delete a line to unset it.\n{}",
        toml::to_string(&current).map_err(|e| Error::Usage(format!("encoding the parameters: {e}")))?
    );
    std::fs::write(&path, text)?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&path)
        .status()?;
    if !status.success() {
        return Err(Error::Outcome(format!(
            "{editor} exited with {status}; nothing changed"
        )));
    }
    let edited = std::fs::read_to_string(&path)?;
    let table: toml::Table = edited
        .parse()
        .map_err(|e| Error::Usage(format!("{}: {e}; nothing changed", path.display())))?;
    let mut edited_map = BTreeMap::new();
    for (k, v) in table {
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => if b { "on" } else { "off" }.to_string(),
            other => {
                return Err(Error::Usage(format!(
                    "{k}: {other} is not a parameter value (a string, number or boolean); nothing changed"
                )))
            }
        };
        edited_map.insert(k, value);
    }
    let set: HashMap<String, String> = edited_map
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let unset: Vec<String> = current
        .keys()
        .filter(|k| !edited_map.contains_key(*k))
        .cloned()
        .collect();
    if set.is_empty() && unset.is_empty() {
        emit(ctx.json, &json!({"cluster": name, "changed": []}), || {
            "no change".to_string()
        });
        return Ok(());
    }
    apply(ctx, &name, set, unset).await
}
