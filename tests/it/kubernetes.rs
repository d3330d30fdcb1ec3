//! The kustomize base in `deploy/kubernetes` (issue 18): its generated parts stay in step with
//! their sources, and turnd runs with exactly the command, environment and probes the
//! Deployment declares (rendered by `kubectl kustomize`, as CI renders it).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_yaml_ng::Value;
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).expect(path);
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn generated_manifests_are_in_step_with_their_sources() {
    let rule = yaml("deploy/kubernetes/prometheusrule.yaml");
    assert_eq!(s(&rule["kind"]), "PrometheusRule");
    let alerts = yaml("deploy/prometheus/turnd-alerts.yml");
    assert_eq!(
        rule["spec"], alerts,
        "deploy/kubernetes/prometheusrule.yaml is stale: run scripts/kubernetes.sh generate"
    );
    let copy = std::fs::read_to_string(repo().join("deploy/kubernetes/turnd.toml")).expect("copy");
    let example = std::fs::read_to_string(repo().join("config/turnd.toml")).expect("example");
    assert!(
        copy == example,
        "deploy/kubernetes/turnd.toml is stale: run scripts/kubernetes.sh generate"
    );

    // The ServiceMonitor scrapes the port the Service and the Deployment name, as job="turnd"
    // (what the alert rules select).
    let monitor = yaml("deploy/kubernetes/servicemonitor.yaml");
    let service = yaml("deploy/kubernetes/service.yaml");
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(s(&monitor["spec"]["endpoints"][0]["path"]), "/metrics");
    let job_label = s(&monitor["spec"]["jobLabel"]);
    assert_eq!(s(&service["metadata"]["labels"][job_label]), "turnd");
    let ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert_eq!(ports[0]["name"], service["spec"]["ports"][0]["name"]);
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("labels") {
        assert_eq!(
            &service["metadata"]["labels"][s(k)],
            v,
            "the ServiceMonitor misses the Service"
        );
        assert_eq!(&deployment["spec"]["template"]["metadata"]["labels"][s(k)], v);
    }
}

/// `kubectl kustomize deploy/kubernetes`, parsed; None (and SKIPPED said) without kubectl.
fn rendered() -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy/kubernetes"))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: kubectl is not available ({e}); it renders the kustomize base");
            return None;
        }
    };
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect();
    Some(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && s(&d["metadata"]["name"]).starts_with(name_prefix))
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().expect("a list").iter().map(|x| s(x).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turnd_runs_as_the_deployment_declares_it() {
    let Some(docs) = rendered() else { return };
    let deployment = find(&docs, "Deployment", "turnd");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let config_map = find(&docs, "ConfigMap", "turnd-config");
    // The ConfigMap the pod mounts is the one rendered (kustomize's hashed name).
    let volume = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"].is_mapping())
        .expect("a configMap volume");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    let mount = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the config is mounted");
    let mount_path = s(&mount["mountPath"]).to_owned();

    // The config as the pod sees it; the grace period covers the drain and the worker stop.
    let toml = s(&config_map["data"]["turnd.toml"]).to_owned();
    let config = turnd::config::Config::from_toml_str(&toml).expect("the ConfigMap's config");
    let grace =
        pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let needed = config.shutdown.grace + config.worker.stop_timeout;
    assert!(
        Duration::from_secs(grace) > needed,
        "terminationGracePeriodSeconds {grace} ≤ {needed:?}"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], Value::Bool(true));

    // The mount, as a directory of this test.
    let cluster_dir = tempfile::tempdir().expect("tempdir");
    let etc = cluster_dir.path().join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::write(etc.join("turnd.toml"), &toml).expect("write config");
    let local = |p: &str| match p.strip_prefix(&format!("{mount_path}/")) {
        Some(rest) => etc.join(rest).display().to_string(),
        None => p.to_owned(),
    };

    // The environment as the kubelet would set it: values as they are, the pod's name from
    // the downward API, the Secret's keys from the test cluster, optional keys absent.
    let mut cluster = Cluster::new().await;
    let port = free_port();
    let pod_name = "turnd-6d5f8b7c9d-x2k4q";
    let mut env: Vec<(String, String)> = Vec::new();
    let mut ops_port = None;
    for e in container["env"].as_sequence().expect("env") {
        let name = s(&e["name"]).to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            pod_name.to_owned()
        } else if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
            match key {
                "database-url" => cluster.db_url.clone(),
                "amqp-url" => AMQP.to_owned(),
                _ if e["valueFrom"]["secretKeyRef"]["optional"] == Value::Bool(true) => continue,
                other => panic!("the test has no value for the Secret key {other}"),
            }
        } else {
            panic!("an env entry this test cannot resolve: {e:?}");
        };
        if name == "TURND_HTTP__OPS_LISTEN" {
            // Isolation: this test's own port, on loopback.
            let declared: u16 =
                value.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
            ops_port = Some(declared);
            env.push((name, format!("127.0.0.1:{port}")));
            continue;
        }
        env.push((name, value));
    }
    let declared = ops_port.expect("the Deployment sets http.ops_listen");
    assert_eq!(
        env.iter().find(|(k, _)| k == "TURND_DATABASE__AUTO_MIGRATE").map(|(_, v)| v.as_str()),
        Some("false")
    );
    // Isolation: this test's prefix and workspace directory (the pod's emptyDir).
    env.push(("TURND_AMQP__PREFIX".into(), cluster.prefix.clone()));
    env.push(("TURND_DAEMON__STATE_DIR".into(), cluster.path("state").display().to_string()));

    // The migration Job's command first (the database is already migrated: it must still
    // succeed, as a re-run Job does).
    let job = find(&docs, "Job", "turnd-migrate");
    let job_container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strings(&job_container["command"]), ["/usr/bin/turnd"]);
    let job_args: Vec<String> = strings(&job_container["args"]).iter().map(|a| local(a)).collect();
    let out = Command::new(turnd_bin())
        .args(&job_args)
        .env_clear()
        .envs(env.iter().filter(|(k, _)| k == "TURND_DATABASE__URL").cloned())
        .output()
        .expect("turnd migrate");
    assert!(out.status.success(), "{job_args:?}: {}", String::from_utf8_lossy(&out.stderr));

    // The daemon: the declared argv (the image's /usr/bin/turnd is this build), that env only.
    assert_eq!(strings(&container["command"]), ["/usr/bin/turnd"]);
    let args: Vec<String> = strings(&container["args"]).iter().map(|a| local(a)).collect();
    let (run, rest) = args.split_first().expect("args");
    assert_eq!(run, "run");
    cluster.env = env.clone();
    cluster.daemon_args = rest.to_vec();
    let extra = [("TURND_DAEMON__ID", pod_name)];
    cluster.start_daemon(&extra).await;

    // Every probe on the port it names (a named port resolves to the container's port).
    let port_of = |p: &Value| -> u16 {
        match &p["httpGet"]["port"] {
            Value::Number(n) => n.as_u64().expect("port") as u16,
            Value::String(name) => container["ports"]
                .as_sequence()
                .expect("ports")
                .iter()
                .find(|x| x["name"] == name.as_str())
                .and_then(|x| x["containerPort"].as_u64())
                .expect("a declared port") as u16,
            other => panic!("probe port {other:?}"),
        }
    };
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let p = &container[probe];
        assert_eq!(port_of(p), declared, "{probe} is not on http.ops_listen");
        let path = s(&p["httpGet"]["path"]).to_owned();
        wait_for_async(T, &format!("{probe} {path} answers 200"), || {
            let path = path.clone();
            async move { matches!(http_get(port, &path).await, Some((200, _))) }
        })
        .await;
    }
    let log = cluster.daemon_log(0);
    assert!(
        log.lines().any(|l| l.starts_with('{') && l.contains("turnd ready")),
        "log.format json: {log}"
    );

    // daemon.id is the pod's name.
    let out = Command::new(turnd_bin())
        .args(["status", "--json"])
        .env_clear()
        .envs(env.iter().cloned())
        .output()
        .expect("turnd status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(status["daemons"][0]["id"], pod_name, "{status}");

    // SIGTERM, as the kubelet sends it: out well within the grace period.
    let exit = cluster.daemons[0]
        .terminate(Duration::from_secs(grace))
        .await
        .expect("exits within the grace period");
    assert!(exit.success(), "{exit:?}");
}
