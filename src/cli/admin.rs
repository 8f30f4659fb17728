//! The admin commands: `cluster status | remove-node`, `topic create | list`.
//!
//! Each runs one call through [`AdminClient`] (which finds the metadata leader) and prints the
//! result as text or JSON (one JSON document on stdout). Errors come back as `anyhow` errors
//! whose message is the one line `main` prints.

use std::time::Duration;

use anyhow::Context;
use aqueduct_protocol::cluster as pb;
use serde_json::{Value, json};

use super::{ClientArgs, ClusterCommand, Output, TopicCommand};
use crate::client::AdminClient;

/// A random non-zero id for one request (std's per-process random hasher keys).
fn request_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish().max(1)
}

fn client(args: &ClientArgs) -> AdminClient {
    AdminClient::new(
        args.server.clone(),
        Duration::from_secs(args.timeout.max(1)),
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs a `cluster` subcommand.
pub fn cluster(cmd: &ClusterCommand) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        ClusterCommand::Status(args) => rt.block_on(status(args)),
        ClusterCommand::Rebalance {
            dry_run,
            wait,
            client: args,
        } => rt.block_on(rebalance(args, *dry_run, *wait)),
        ClusterCommand::RemoveNode {
            node_id,
            wait,
            client: args,
        } => rt.block_on(async {
            let id = *node_id;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(*wait);
            let mut said = String::new();
            loop {
                let r = client(args)
                    .on_leader(|mut c| async move {
                        c.remove_node(pb::RemoveNodeRequest { node_id: id }).await
                    })
                    .await;
                match r {
                    Ok(_) => break,
                    // Its replicas are moving: say so once, and ask again.
                    Err(e)
                        if e.code() == Some("REASSIGNMENT_IN_PROGRESS")
                            && tokio::time::Instant::now() < deadline =>
                    {
                        let now = e.to_string();
                        if now != said {
                            eprintln!("{now}");
                            said = now;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e))
                            .with_context(|| format!("cannot remove node {id}"));
                    }
                }
            }
            match args.output {
                Output::Json => println!("{}", json!({"removed": id})),
                Output::Text => println!(
                    "node {id} removed from the cluster; its process can be stopped and its data \
                     directory deleted"
                ),
            }
            Ok(())
        }),
    }
}

/// `cluster status`: the leader's view of every member, plus each member's own view (state,
/// applied index, metadata checksum) asked of it directly.
async fn status(args: &ClientArgs) -> anyhow::Result<()> {
    let reply = client(args)
        .on_leader(|mut c| async move { c.status(pb::StatusRequest {}).await })
        .await
        .context("cannot get the cluster status")?;
    let mut nodes = Vec::new();
    for n in &reply.nodes {
        let info = node_info(&n.addr).await;
        let mut v = json!({
            "node_id": n.node_id,
            "addr": n.addr,
            "role": n.role,
            "alive": n.alive,
            "last_heard_ms": n.last_heard_ms,
            "matched_index": n.matched_index,
            "lag": n.lag,
            "leader": n.node_id == reply.leader_id,
        });
        match info {
            Ok(i) => {
                v["state"] = json!(i.state);
                v["applied_index"] = json!(i.applied_index);
                v["records"] = json!(i.records);
                v["state_checksum"] = json!(format!("{:08x}", i.state_checksum));
            }
            Err(e) => v["error"] = json!(e.to_string()),
        }
        nodes.push(v);
    }
    let doc = json!({
        "leader_id": reply.leader_id,
        "leader_addr": reply.leader_addr,
        "term": reply.term,
        "last_log_index": reply.last_log_index,
        "committed_index": reply.committed_index,
        "nodes": nodes,
    });
    match args.output {
        Output::Json => println!("{doc}"),
        Output::Text => print_status(&doc),
    }
    Ok(())
}

async fn node_info(addr: &str) -> anyhow::Result<pb::NodeInfoReply> {
    let call = async {
        let mut c = AdminClient::connect(addr).await?;
        Ok::<_, anyhow::Error>(c.node_info(pb::NodeInfoRequest {}).await?.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2 s"))?
}

fn print_status(doc: &Value) {
    println!(
        "metadata leader: node {} at {} (term {}, last index {}, committed {})",
        doc["leader_id"],
        doc["leader_addr"].as_str().unwrap_or("?"),
        doc["term"],
        doc["last_log_index"],
        doc["committed_index"]
    );
    println!(
        "{:>6}  {:<22} {:<8} {:<6} {:>9} {:>6} {:>9}  {:<10} {:>8}",
        "NODE", "ADDRESS", "ROLE", "ALIVE", "HEARD", "LAG", "APPLIED", "STATE", "CHECKSUM"
    );
    for n in doc["nodes"].as_array().into_iter().flatten() {
        let heard = match n["last_heard_ms"].as_i64() {
            Some(ms) if ms >= 0 => format!("{ms} ms"),
            _ => "never".into(),
        };
        let id = format!(
            "{}{}",
            n["node_id"],
            if n["leader"].as_bool() == Some(true) {
                "*"
            } else {
                ""
            }
        );
        println!(
            "{:>6}  {:<22} {:<8} {:<6} {:>9} {:>6} {:>9}  {:<10} {:>8}",
            id,
            n["addr"].as_str().unwrap_or("?"),
            n["role"].as_str().unwrap_or("?"),
            if n["alive"].as_bool() == Some(true) {
                "yes"
            } else {
                "NO"
            },
            heard,
            n["lag"].to_string(),
            n["applied_index"].to_string(),
            n["state"].as_str().unwrap_or("unreachable"),
            n["state_checksum"].as_str().unwrap_or("-"),
        );
    }
}

fn topic_json(t: &pb::Topic) -> Value {
    let configs: serde_json::Map<String, Value> = t
        .configs
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "name": t.name,
        "partitions": t.partitions,
        "replication_factor": t.replication_factor,
        "configs": configs,
        "assignment": t.assignment.iter().map(|a| json!({"partition": a.partition, "replicas": a.replicas})).collect::<Vec<_>>(),
    })
}

fn print_topic(t: &pb::Topic) {
    let mut configs: Vec<String> = t.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    configs.sort();
    println!(
        "{}  partitions={} replication-factor={}{}",
        t.name,
        t.partitions,
        t.replication_factor,
        if configs.is_empty() {
            String::new()
        } else {
            format!(" {}", configs.join(" "))
        }
    );
    for a in &t.assignment {
        println!("  partition {}: replicas {:?}", a.partition, a.replicas);
    }
}

/// Runs a `topic` subcommand.
pub fn topic(cmd: &TopicCommand) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
            client: args,
        } => rt.block_on(async {
            let request = pb::CreateTopicRequest {
                name: name.clone(),
                partitions: *partitions,
                replication_factor: *replication_factor,
                configs: configs.iter().cloned().collect(),
                // Lets the leader recognise our own retry after a lost reply.
                request_id: request_id(),
                ..Default::default()
            };
            let reply = client(args)
                .on_leader(|mut c| {
                    let request = request.clone();
                    async move { c.create_topic(request).await }
                })
                .await
                .with_context(|| format!("cannot create topic {name}"))?;
            let topic = reply.topic.unwrap_or_default();
            match args.output {
                Output::Json => println!("{}", topic_json(&topic)),
                Output::Text => {
                    println!("created topic {}", topic.name);
                    print_topic(&topic);
                }
            }
            Ok(())
        }),
        TopicCommand::Describe { name, client: args } => {
            rt.block_on(super::data::describe(args, name))
        }
        TopicCommand::Delete { name, client: args } => rt.block_on(async {
            let request = pb::DeleteTopicRequest { name: name.clone() };
            client(args)
                .on_leader(|mut c| {
                    let request = request.clone();
                    async move { c.delete_topic(request).await }
                })
                .await
                .with_context(|| format!("cannot delete topic {name}"))?;
            match args.output {
                Output::Json => println!("{}", json!({"deleted": name})),
                Output::Text => println!("deleted topic {name}"),
            }
            Ok(())
        }),
        TopicCommand::Alter {
            name,
            partitions,
            configs,
            delete,
            client: args,
        } => rt.block_on(async {
            let request = pb::AlterTopicRequest {
                name: name.clone(),
                set: configs.iter().cloned().collect(),
                delete: delete.clone(),
                partitions: partitions.unwrap_or(0),
                validate_only: false,
            };
            let reply = client(args)
                .on_leader(|mut c| {
                    let request = request.clone();
                    async move { c.alter_topic(request).await }
                })
                .await
                .with_context(|| format!("cannot alter topic {name}"))?;
            let topic = reply.topic.unwrap_or_default();
            match args.output {
                Output::Json => println!("{}", topic_json(&topic)),
                Output::Text => print_topic(&topic),
            }
            Ok(())
        }),
        TopicCommand::List(args) => rt.block_on(async {
            let reply = client(args)
                .on_leader(|mut c| async move { c.list_topics(pb::ListTopicsRequest {}).await })
                .await
                .context("cannot list topics")?;
            match args.output {
                Output::Json => println!(
                    "{}",
                    json!({"topics": reply.topics.iter().map(topic_json).collect::<Vec<_>>()})
                ),
                Output::Text => {
                    for t in &reply.topics {
                        print_topic(t);
                    }
                }
            }
            Ok(())
        }),
    }
}

/// `cluster rebalance`: starts the moves, prints them, and waits until no partition is moving.
async fn rebalance(args: &ClientArgs, dry_run: bool, wait: u64) -> anyhow::Result<()> {
    let ask = |dry_run: bool| async move {
        client(args)
            .on_leader(|mut c| async move { c.rebalance(pb::RebalanceRequest { dry_run }).await })
            .await
            .context("cannot rebalance")
    };
    let reply = ask(dry_run).await?;
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "moves": reply.moves.iter().map(|m| json!({
                    "topic": m.topic, "partition": m.partition, "from": m.from, "to": m.to,
                })).collect::<Vec<_>>(),
                "moving": reply.moving,
                "dry_run": dry_run,
            })
        ),
        Output::Text => {
            for m in &reply.moves {
                println!("{}/{}: {:?} -> {:?}", m.topic, m.partition, m.from, m.to);
            }
            println!(
                "{} partition(s) to change{}",
                reply.moves.len(),
                if dry_run { " (dry run)" } else { "" }
            );
        }
    }
    if dry_run || wait == 0 {
        return Ok(());
    }
    // Wait until no partition is moving (a dry run reports the moves under way).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut moving = reply.moving;
    while moving > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{moving} partition(s) still moving after {wait} s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        moving = ask(true).await?.moving;
    }
    if args.output == Output::Text {
        println!("every move is done");
    }
    Ok(())
}
