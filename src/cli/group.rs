//! `aqueduct group list | describe | reset-offsets`: consumer groups from the command line.

use std::collections::BTreeMap;

use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use aqueduct_protocol::group as gpb;
use aqueduct_protocol::group::groups_client::GroupsClient;
use bytes::Bytes;
use serde_json::json;
use tonic::transport::Endpoint;

use super::data::{From, admin_client};
use super::{ClientArgs, GroupCommand, Output};
use crate::client::consumer::Coordinator;
use crate::client::group::decode_assignment;
use crate::client::router::Router;

pub async fn run(cmd: &GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::List(args) => list(args).await,
        GroupCommand::Describe { group, client } => describe(client, group).await,
        GroupCommand::ResetOffsets {
            group,
            to,
            topic,
            client,
        } => reset(client, group, to, topic.as_deref()).await,
    }
}

/// Every node lists the groups it coordinates; the union is every group.
async fn list(args: &ClientArgs) -> anyhow::Result<()> {
    let admin = admin_client(args);
    let status = admin
        .on_leader(|mut c| async move { c.status(cpb::StatusRequest {}).await })
        .await?;
    let mut groups: BTreeMap<String, gpb::GroupListing> = BTreeMap::new();
    for node in &status.nodes {
        let channel = Endpoint::from_shared(format!("http://{}", node.addr))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect()
            .await;
        let Ok(channel) = channel else {
            eprintln!(
                "aqueduct: warning: node {} at {} is unreachable; its groups are missing",
                node.node_id, node.addr
            );
            continue;
        };
        match GroupsClient::new(channel)
            .list_groups(gpb::ListGroupsRequest {})
            .await
        {
            Ok(r) => {
                for g in r.into_inner().groups {
                    groups.insert(g.group.clone(), g);
                }
            }
            Err(e) => eprintln!(
                "aqueduct: warning: node {} did not list its groups: {}",
                node.node_id,
                e.message()
            ),
        }
    }
    match args.output {
        Output::Json => println!(
            "{}",
            json!(groups.values().map(|g| json!({"group": g.group, "state": g.state, "protocol_type": g.protocol_type, "members": g.members})).collect::<Vec<_>>())
        ),
        Output::Text => {
            for g in groups.values() {
                println!("{}\t{}\t{} member(s)", g.group, g.state, g.members);
            }
        }
    }
    Ok(())
}

async fn describe(args: &ClientArgs, group: &str) -> anyhow::Result<()> {
    let admin = admin_client(args);
    let coordinator = Coordinator::locate(&admin, group).await?;
    let request = gpb::DescribeGroupRequest {
        group: group.to_string(),
    };
    let d = coordinator
        .call(|mut c| {
            let request = request.clone();
            async move { c.describe_group(request).await }
        })
        .await?;
    let mut owner: BTreeMap<(String, u32), String> = BTreeMap::new();
    let mut members = Vec::new();
    for m in &d.members {
        let parts = decode_assignment(Bytes::from(m.assignment.clone())).unwrap_or_default();
        for tp in &parts {
            owner.insert(tp.clone(), m.member_id.clone());
        }
        members.push(json!({
            "member_id": m.member_id,
            "client_id": m.client_id,
            "host": m.host,
            "partitions": parts.iter().map(|(t, p)| json!({"topic": t, "partition": p})).collect::<Vec<_>>(),
        }));
    }
    let mut routers: BTreeMap<String, Option<Router>> = BTreeMap::new();
    let mut offsets = Vec::new();
    for o in &d.offsets {
        if !routers.contains_key(&o.topic) {
            routers.insert(
                o.topic.clone(),
                Router::new(&admin, &o.topic, false).await.ok(),
            );
        }
        let end = match routers.get(&o.topic).and_then(Option::as_ref) {
            Some(r) => r
                .list_offset(o.partition, pb::OffsetSpec::Latest, 0)
                .await
                .ok()
                .map(|(e, _)| e),
            None => None,
        };
        offsets.push(json!({
            "topic": o.topic,
            "partition": o.partition,
            "committed": o.offset,
            "end": end,
            "lag": end.map(|e| e.saturating_sub(o.offset.max(0) as u64)),
            "member": owner.get(&(o.topic.clone(), o.partition)),
        }));
    }
    let doc = json!({
        "group": d.group,
        "state": d.state,
        "protocol_type": d.protocol_type,
        "protocol": d.protocol,
        "generation": d.generation,
        "members": members,
        "offsets": offsets,
    });
    match args.output {
        Output::Json => println!("{doc}"),
        Output::Text => {
            println!(
                "group {} ({}, generation {}, {} member(s))",
                d.group,
                d.state,
                d.generation,
                d.members.len()
            );
            for m in &members {
                println!(
                    "  member {} ({}): {}",
                    m["member_id"].as_str().unwrap_or(""),
                    m["host"].as_str().unwrap_or(""),
                    m["partitions"]
                );
            }
            for o in &offsets {
                println!(
                    "  {}/{}: committed {} end {} lag {}",
                    o["topic"].as_str().unwrap_or(""),
                    o["partition"],
                    o["committed"],
                    o["end"],
                    o["lag"]
                );
            }
        }
    }
    Ok(())
}

/// Sets the offsets of an inactive group: to the earliest or latest offset, or the first at
/// or after a time, of every partition of its topics (or of `--topic`).
async fn reset(
    args: &ClientArgs,
    group: &str,
    to: &From,
    topic: Option<&str>,
) -> anyhow::Result<()> {
    let (spec, ts) = match to {
        From::Earliest => (pb::OffsetSpec::Earliest, 0),
        From::Latest => (pb::OffsetSpec::Latest, 0),
        From::Time(t) => (pb::OffsetSpec::Timestamp, *t),
        From::Offset(_) => anyhow::bail!("--to takes earliest, latest or an RFC 3339 time"),
    };
    let admin = admin_client(args);
    let coordinator = Coordinator::locate(&admin, group).await?;
    let request = gpb::DescribeGroupRequest {
        group: group.to_string(),
    };
    let d = coordinator
        .call(|mut c| {
            let request = request.clone();
            async move { c.describe_group(request).await }
        })
        .await?;
    if !d.members.is_empty() {
        anyhow::bail!(
            "group {group} has {} active member(s); stop them first (NON_EMPTY_GROUP)",
            d.members.len()
        );
    }
    let topics: Vec<String> = match topic {
        Some(t) => vec![t.to_string()],
        None => {
            let mut t: Vec<String> = d.offsets.iter().map(|o| o.topic.clone()).collect();
            t.dedup();
            t
        }
    };
    if topics.is_empty() {
        anyhow::bail!(
            "group {group} has no committed offsets; name a topic with --topic (GROUP_ID_NOT_FOUND)"
        );
    }
    let mut offsets = Vec::new();
    for t in &topics {
        let router = Router::new(&admin, t, false).await?;
        for p in 0..router.partitions() {
            let (o, _) = router.list_offset(p, spec, ts).await?;
            offsets.push(gpb::TopicPartitionOffset {
                topic: t.clone(),
                partition: p,
                offset: o as i64,
                metadata: String::new(),
            });
        }
    }
    coordinator.commit_inactive(group, offsets.clone()).await?;
    match args.output {
        Output::Json => println!(
            "{}",
            json!(
                offsets
                    .iter()
                    .map(
                        |o| json!({"topic": o.topic, "partition": o.partition, "offset": o.offset})
                    )
                    .collect::<Vec<_>>()
            )
        ),
        Output::Text => {
            for o in &offsets {
                println!("{}/{}: {}", o.topic, o.partition, o.offset);
            }
        }
    }
    Ok(())
}
