//! `limctl verify PLAN`: reproducibility verification through liminald's
//! `VerifyReproducible`, or in this process with `--local`.
//!
//! Exit codes follow the run rules: 0 reproducible, 1 built but not
//! reproducible, 2 could not verify (plan error, a build that did not pass,
//! no artifacts, unknown variation), 3 cancelled.

use crate::{bus_err, fail, ManagerProxy};
use liminal_engine::repro::{self, VerifyOptions};
use liminal_engine::CancelHandle;
use liminal_facts::record::RunRecord;
use liminal_facts::{FactBody, RunStatus};
use liminal_plan::Plan;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use zbus::zvariant::{self, Value as ZValue};

pub struct Args<'a> {
    pub plan: &'a Path,
    pub runs: u32,
    pub vary: Vec<String>,
    pub json: bool,
    pub culprit_search: bool,
    pub diffoscope: bool,
}

/// In this process, without the daemon (state as `limctl run --local`).
pub fn local(args: &Args<'_>) -> anyhow::Result<u8> {
    let plan = Plan::load(args.plan).map_err(|e| fail(2, e.to_string()))?;
    let opts = VerifyOptions {
        runs: args.runs,
        vary: repro::parse_vary(&args.vary).map_err(|e| fail(2, e.to_string()))?,
        culprit_search: args.culprit_search,
        diffoscope: args.diffoscope,
        ..VerifyOptions::default()
    };
    let cfg = crate::local::config();
    let run_id = liminal_facts::new_id();
    let mut record = RunRecord::new(
        run_id,
        plan.name.clone(),
        cfg.host.clone(),
        Some(plan.timeout),
    );
    let mut sink = |fact: FactBody| {
        record.apply(&fact);
    };
    let result = repro::verify(
        &cfg,
        run_id,
        plan,
        Default::default(),
        &opts,
        &mut sink,
        &CancelHandle::new(),
    );
    match result {
        Ok(v) => {
            record.status = if v.reproducible {
                RunStatus::Passed
            } else {
                RunStatus::Failed
            };
            let run = record.to_json();
            print(&run, args.json);
            Ok(exit_code(&run))
        }
        Err(e) => Err(fail(2, format!("verification failed: {e}"))),
    }
}

/// Through liminald: VerifyReproducible, then follow the run object.
pub async fn remote(
    conn: &zbus::Connection,
    mgr: &ManagerProxy<'_>,
    args: &Args<'_>,
) -> anyhow::Result<u8> {
    let plan = args.plan;
    let text = std::fs::read_to_string(plan)
        .map_err(|e| fail(2, format!("{}:1:1: cannot read plan: {e}", plan.display())))?;
    let abs = std::path::absolute(plan).unwrap_or_else(|_| plan.to_path_buf());
    let plan_path = abs.to_string_lossy().into_owned();
    let vary: Vec<String> = args
        .vary
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let mut options: HashMap<&str, ZValue<'_>> = HashMap::new();
    options.insert("plan_path", ZValue::from(plan_path.as_str()));
    options.insert("runs", ZValue::from(args.runs));
    if !vary.is_empty() {
        options.insert("vary", ZValue::from(vary));
    }
    if !args.culprit_search {
        options.insert("culprit_search", ZValue::from(false));
    }
    if !args.diffoscope {
        options.insert("diffoscope", ZValue::from(false));
    }
    let (run_id, path) = mgr
        .verify_reproducible(&text, HashMap::<String, zvariant::OwnedFd>::new(), options)
        .await
        .map_err(bus_err)?;
    // The verdict fact comes right before the final state.
    let run = crate::follow_run(conn, mgr, &run_id, &path, args.json).await?;
    print(&run, args.json);
    Ok(exit_code(&run))
}

fn exit_code(run: &Value) -> u8 {
    match (
        run["repro"]["reproducible"].as_bool(),
        run["status"].as_str(),
    ) {
        (Some(true), _) => 0,
        (Some(false), _) => 1,
        (None, Some("cancelled" | "interrupted")) => 3,
        (None, _) => 2,
    }
}

/// The run object with its verdict, or a readable account of it.
pub fn print(run: &Value, json: bool) {
    if json {
        println!("{run}");
        return;
    }
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    let r = &run["repro"];
    let verdict = match r["reproducible"].as_bool() {
        Some(true) => "REPRODUCIBLE",
        Some(false) => "NOT REPRODUCIBLE",
        None => "NO VERDICT",
    };
    println!(
        "run {}  plan {}  {verdict}",
        s(&run["run_id"]),
        s(&run["plan_name"])
    );
    if r.is_null() {
        println!("status {}", s(&run["status"]));
        if let Some(reason) = run["reason"].as_str() {
            println!("reason: {reason}");
        }
        return;
    }
    println!("input {}", s(&r["input_digest"]));
    println!("varied: {}", list(&r["variations"]));
    if r["skipped"].as_array().is_some_and(|a| !a.is_empty()) {
        println!("not varied: {}", list(&r["skipped"]));
    }
    println!("artifacts compared: {}", r["artifacts_compared"]);
    for d in r["differing"].as_array().into_iter().flatten() {
        println!("differs: {}", s(&d["path"]));
        for (i, digest) in d["digests"].as_array().into_iter().flatten().enumerate() {
            let who = if i == 0 {
                "control".to_owned()
            } else {
                format!("varied-{i}")
            };
            println!("    {who:<9} {}", s(digest));
        }
        if d["culprits"].as_array().is_some_and(|a| !a.is_empty()) {
            println!("    caused by: {}", list(&d["culprits"]));
        }
        if let Some(rep) = d["report_blake3"].as_str() {
            println!("    diffoscope report: blake3 {rep} (in the CAS)");
        }
    }
    match (r["culprit"].as_str(), r["nondeterministic"].as_bool()) {
        (Some(c), _) => println!("culprit: {c}"),
        (None, Some(true)) => println!(
            "culprit: none — the build differs even with nothing varied (nondeterministic)"
        ),
        (None, _) if r["culprits"].as_array().is_some_and(|a| !a.is_empty()) => {
            println!("culprits: {}", list(&r["culprits"]))
        }
        (None, _) if r["reproducible"] == Value::Bool(false) => println!("culprit: not found"),
        _ => {}
    }
}
