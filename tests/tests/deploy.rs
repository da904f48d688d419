//! The deployment recipes against the binaries they run. The kustomize base in
//! `deploy/kubernetes` and the HA overlay in `deploy/kubernetes/overlays/ha` (three
//! control planes on PostgreSQL) are
//! - parsed and checked: every `CHARTER_*` variable and `--flag` a container uses exists in
//!   its binary's `--help` (so manifests and binaries cannot drift apart), the security
//!   context, the probes, and how Services, Secrets and volumes fit together; the overlay
//!   as `scripts/validate-manifests --render` renders it (as `kubectl kustomize` does), with
//!   its replicas, disruption budget, anti-affinity and database Secret;
//! - run: the real `charter-cp` and `charter-dp` started with exactly the manifests'
//!   environment (mount paths mapped to temp dirs, the Secrets made as the README makes
//!   them), until a data plane enforces a license added through the token-protected API;
//!   for the overlay, three control planes on one real PostgreSQL started by the test;
//! - validated against the Kubernetes schemas by `scripts/validate-manifests` (which needs
//!   PyPI on its first run, to install kubernetes-validate into `.venv`), broken copies
//!   included.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use charter_store::testing::TestPostgres;
use charter_tests::{bin, eventually, free_port, http, http_with_headers, run, workspace_root};
use charter_tests::{Body, Resp};
use serde_json::{json, Value};
use tempfile::TempDir;

/// The uid every Charter container runs as (the image's user, too).
const UID: i64 = 10001;

// ---------------------------------------------------------------------------------------
// Reading the manifests
// ---------------------------------------------------------------------------------------

/// The kustomize base.
fn base() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// The HA overlay: three control planes on PostgreSQL.
fn ha() -> PathBuf {
    base().join("overlays/ha")
}

/// The YAML documents of a file, as JSON values (empty documents skipped).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    yaml_stream(&text, &path.display().to_string())
}

/// The documents of a YAML stream (`---`-separated), as JSON values (empty ones skipped).
fn yaml_stream(text: &str, what: &str) -> Vec<Value> {
    let mut documents = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            documents.push(String::new());
        } else {
            let last = documents.last_mut().expect("at least one document");
            last.push_str(line);
            last.push('\n');
        }
    }
    documents
        .iter()
        .map(|doc| {
            serde_norway::from_str::<Value>(doc)
                .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The `kustomization.yaml` of a directory.
fn kustomization_of(dir: &Path) -> Value {
    let mut docs = yaml_documents(&dir.join("kustomization.yaml"));
    assert_eq!(docs.len(), 1, "kustomization.yaml holds one document");
    docs.remove(0)
}

/// The base's `kustomization.yaml`.
fn kustomization() -> Value {
    kustomization_of(&base())
}

/// The files listed in a directory's `kustomization.yaml` `resources`.
fn resource_files_of(dir: &Path) -> Vec<String> {
    kustomization_of(dir)["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| r.as_str().expect("a resource is a file name").to_owned())
        .collect()
}

/// The files listed in the base's `kustomization.yaml` `resources`.
fn resource_files() -> Vec<String> {
    resource_files_of(&base())
}

/// The `*.yaml` / `*.yml` files of a directory but `kustomization.yaml`.
fn manifest_files(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .collect()
}

/// One Kubernetes object and the file it is in.
#[derive(Debug)]
struct Object {
    file: String,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// `KIND/NAME (FILE)`, for messages.
    fn label(&self) -> String {
        format!("{}/{} ({})", self.kind(), self.name(), self.file)
    }

    /// The pod spec of a workload (`spec.template.spec`), if it is one.
    fn pod_spec(&self) -> Option<&Value> {
        let spec = &self.value["spec"]["template"]["spec"];
        spec.is_object().then_some(spec)
    }

    /// The labels of a workload's pods.
    fn pod_labels(&self) -> &Value {
        &self.value["spec"]["template"]["metadata"]["labels"]
    }
}

/// Every object of every resource file of the base.
fn objects() -> Vec<Object> {
    let mut objects = Vec::new();
    for file in resource_files() {
        for value in yaml_documents(&base().join(&file)) {
            objects.push(Object {
                file: file.clone(),
                value,
            });
        }
    }
    objects
}

/// The HA overlay's objects as `scripts/validate-manifests --render` renders them: as
/// `kubectl kustomize deploy/kubernetes/overlays/ha` does (namespace and image set).
fn ha_objects() -> Vec<Object> {
    let out = Command::new(workspace_root().join("scripts/validate-manifests"))
        .arg("--render")
        .arg(ha())
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/validate-manifests --render");
    assert!(
        out.status.success(),
        "scripts/validate-manifests --render deploy/kubernetes/overlays/ha failed:\n{}",
        stderr(&out)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    yaml_stream(&text, "the rendered overlay")
        .into_iter()
        .map(|value| Object {
            file: "overlays/ha, rendered".to_owned(),
            value,
        })
        .collect()
}

/// The base as written and the HA overlay as rendered, each with its name, for the checks
/// both must pass.
fn every_kustomization() -> [(&'static str, Vec<Object>); 2] {
    [
        ("deploy/kubernetes", objects()),
        ("overlays/ha", ha_objects()),
    ]
}

/// The object of that kind and name.
fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| {
            let found: Vec<String> = objects.iter().map(Object::label).collect();
            panic!("no {kind}/{name}; found {found:?}")
        })
}

/// The workloads: objects with a pod template.
fn workloads(objects: &[Object]) -> Vec<&Object> {
    let workloads: Vec<&Object> = objects.iter().filter(|o| o.pod_spec().is_some()).collect();
    assert!(!workloads.is_empty(), "no workload in the manifests");
    workloads
}

/// The one workload running `binary` (the control plane's kind differs between the base
/// and the overlay).
fn workload_running<'a>(objects: &'a [Object], binary: &str) -> &'a Object {
    let found: Vec<&Object> = workloads(objects)
        .into_iter()
        .filter(|o| binary_of(o, main_container(o)) == binary)
        .collect();
    assert_eq!(found.len(), 1, "one workload runs {binary}: {found:?}");
    found[0]
}

/// Whether a label selector (`matchLabels` only) selects pods with these labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "the selectors here use matchLabels only"
    );
    let wanted = selector["matchLabels"]
        .as_object()
        .expect("a matchLabels selector");
    !wanted.is_empty() && wanted.iter().all(|(key, value)| &labels[key] == value)
}
/// The containers (and init containers) of a pod spec.
fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| pod[*key].as_array())
        .flatten()
        .collect()
}

/// The one container of a Charter workload.
fn main_container(object: &Object) -> &Value {
    let pod = object.pod_spec().expect("a workload");
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{} runs one container", object.label());
    &containers[0]
}

/// The binary a container runs: the file name of `command[0]` (the image holds three).
fn binary_of(object: &Object, container: &Value) -> String {
    let command = container["command"][0].as_str().unwrap_or_else(|| {
        panic!(
            "{}: container {} must name its binary in `command` (the image holds charter-cp, charter-dp and charterctl)",
            object.label(),
            container["name"]
        )
    });
    Path::new(command)
        .file_name()
        .expect("a binary name")
        .to_string_lossy()
        .into_owned()
}

/// The `env` of a container as name → value (`valueFrom` entries map to `None`).
fn env_of(container: &Value) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    for entry in container["env"].as_array().into_iter().flatten() {
        let name = entry["name"].as_str().expect("an env entry has a name");
        let value = entry["value"].as_str().map(str::to_owned);
        assert!(
            env.insert(name.to_owned(), value).is_none(),
            "{name} is set twice in container {}",
            container["name"]
        );
    }
    env
}

/// A variable the container must set, with a literal value.
fn setting<'a>(env: &'a BTreeMap<String, Option<String>>, name: &str) -> &'a str {
    env.get(name)
        .and_then(Option::as_deref)
        .unwrap_or_else(|| panic!("{name} is not set (with a literal value)"))
}

/// The port of a `HOST:PORT` value.
fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` is not HOST:PORT"))
}

/// The container port a probe or Service names (by name or number).
fn container_port(container: &Value, port: &Value) -> i64 {
    if let Some(number) = port.as_i64() {
        return number;
    }
    let name = port.as_str().expect("a port is a name or a number");
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("container {} has no port named {name}", container["name"]))
}

// ---------------------------------------------------------------------------------------
// Reading the binaries
// ---------------------------------------------------------------------------------------

/// What a binary's `--help` offers.
#[derive(Debug)]
struct Help {
    env: BTreeSet<String>,
    flags: BTreeSet<String>,
}

/// Runs `BINARY --help` and collects its `[env: NAME=…]` variables and `--flags`.
fn help(binary: &str) -> Help {
    let out = run(binary, &["--help"]);
    assert!(out.status.success(), "{binary} --help failed");
    let text = String::from_utf8(out.stdout).expect("--help is UTF-8");
    let env: BTreeSet<String> = text
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    let flags: BTreeSet<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(str::to_owned)
        .collect();
    assert!(
        env.contains("CHARTER_DATA_DIR") && flags.contains("--data-dir"),
        "{binary} --help lists no CHARTER_DATA_DIR / --data-dir: is the parser right?\n{text}"
    );
    Help { env, flags }
}

// ---------------------------------------------------------------------------------------
// The base and its parts
// ---------------------------------------------------------------------------------------

#[test]
fn the_kustomization_lists_every_manifest_and_the_base_has_its_parts() {
    let listed: BTreeSet<String> = resource_files().into_iter().collect();
    assert_eq!(
        listed,
        manifest_files(&base()),
        "kustomization.yaml resources and the manifest files of deploy/kubernetes differ"
    );
    let kustomization = kustomization();
    assert_eq!(kustomization["kind"], "Kustomization");
    assert_eq!(kustomization["namespace"], "charter");

    let objects = objects();
    find(&objects, "Namespace", "charter");
    for object in objects.iter().filter(|o| o.kind() != "Namespace") {
        assert_eq!(
            object.value["metadata"]["namespace"],
            "charter",
            "{} is in the namespace charter",
            object.label()
        );
    }

    let cp = find(&objects, "StatefulSet", "charter-cp");
    assert_eq!(cp.value["spec"]["replicas"], 1, "sled is single-writer");
    let claims = cp.value["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("the CP StatefulSet has a volumeClaimTemplate for its data dir");
    assert_eq!(claims.len(), 1);

    let dp = find(&objects, "Deployment", "charter-dp");
    assert_eq!(dp.value["spec"]["replicas"], 2);

    let admin = find(&objects, "Service", "charter-cp-admin");
    assert_eq!(admin.value["spec"]["type"], "ClusterIP");
    assert_eq!(admin.value["spec"]["ports"][0]["port"], 8001);
    let cluster = find(&objects, "Service", "charter-cp-cluster");
    assert_eq!(cluster.value["spec"]["ports"][0]["port"], 8005);

    // Secrets are referenced, never embedded.
    assert!(
        objects.iter().all(|o| o.kind() != "Secret"),
        "the base embeds a Secret; the operator creates them (README)"
    );
}

#[test]
fn every_setting_exists_in_the_binary_it_configures() {
    for (kustomization, objects) in every_kustomization() {
        let checked = check_settings_exist(&objects);
        assert!(
            checked > 10,
            "{kustomization}: only {checked} CHARTER_* variables were found"
        );
    }

    let objects = objects();
    let cp = main_container(find(&objects, "StatefulSet", "charter-cp"));
    assert_eq!(
        binary_of(find(&objects, "StatefulSet", "charter-cp"), cp),
        "charter-cp"
    );
    let env = env_of(cp);
    for name in [
        "CHARTER_DATA_DIR",
        "CHARTER_ADMIN_LISTEN",
        "CHARTER_ADMIN_TOKEN_FILE",
        "CHARTER_CLUSTER_LISTEN",
        "CHARTER_TRUSTED_KEY",
        "CHARTER_CLUSTER_CERT",
        "CHARTER_CLUSTER_CERT_KEY",
    ] {
        setting(&env, name);
    }
    let dp = main_container(find(&objects, "Deployment", "charter-dp"));
    assert_eq!(
        binary_of(find(&objects, "Deployment", "charter-dp"), dp),
        "charter-dp"
    );
    let env = env_of(dp);
    for name in [
        "CHARTER_CONTROL_PLANE",
        "CHARTER_DATA_DIR",
        "CHARTER_STATUS_LISTEN",
        "CHARTER_TRUSTED_KEY",
        "CHARTER_CLUSTER_CERT",
        "CHARTER_CLUSTER_CERT_KEY",
    ] {
        setting(&env, name);
    }
}

/// Checks every `CHARTER_*` variable and `--flag` of every container against its binary's
/// `--help`; returns how many variables it checked.
fn check_settings_exist(objects: &[Object]) -> usize {
    let mut helps: BTreeMap<String, Help> = BTreeMap::new();
    let mut checked = 0;
    for object in workloads(objects) {
        for container in containers(object.pod_spec().expect("a workload")) {
            let binary = binary_of(object, container);
            let help = helps.entry(binary.clone()).or_insert_with(|| help(&binary));
            let env = env_of(container);
            assert!(
                container["envFrom"].is_null(),
                "{}: settings are listed one by one in `env`, not pulled in with envFrom",
                object.label()
            );
            for name in env.keys().filter(|n| n.starts_with("CHARTER_")) {
                assert!(
                    help.env.contains(name),
                    "{}: {name} is not a variable of {binary} (its --help lists {:?})",
                    object.label(),
                    help.env
                );
                checked += 1;
            }
            let words = container["command"]
                .as_array()
                .into_iter()
                .flatten()
                .skip(1)
                .chain(container["args"].as_array().into_iter().flatten());
            for word in words {
                let word = word.as_str().expect("command and args are strings");
                if let Some(flag) = word.strip_prefix("--").map(|f| f.split('=').next()) {
                    let flag = format!("--{}", flag.unwrap_or_default());
                    assert!(
                        help.flags.contains(&flag),
                        "{}: {flag} is not a flag of {binary} (its --help lists {:?})",
                        object.label(),
                        help.flags
                    );
                }
            }
            assert!(
                !env.contains_key("CHARTER_CLUSTER_INSECURE"),
                "{}: the cluster port is never plaintext in a deployment",
                object.label()
            );
        }
    }
    checked
}

#[test]
fn every_pod_runs_as_non_root_with_a_read_only_root_and_no_privileges() {
    for (_, objects) in every_kustomization() {
        check_security(&objects);
    }
}

fn check_security(objects: &[Object]) {
    for object in workloads(objects) {
        let label = object.label();
        let pod = object.pod_spec().expect("a workload");
        let pod_sc = &pod["securityContext"];
        assert_eq!(pod_sc["runAsNonRoot"], true, "{label}: pod runAsNonRoot");
        assert_eq!(pod_sc["runAsUser"], UID, "{label}: pod runAsUser");
        assert_eq!(pod["automountServiceAccountToken"], false, "{label}");
        // Otherwise Kubernetes injects CHARTER_CP_ADMIN_PORT=tcp://… and the like.
        assert_eq!(
            pod["enableServiceLinks"], false,
            "{label}: enableServiceLinks"
        );
        for container in containers(pod) {
            let sc = &container["securityContext"];
            // A container setting wins over the pod's.
            let effective = |key: &str| -> Value {
                if sc[key].is_null() {
                    pod_sc[key].clone()
                } else {
                    sc[key].clone()
                }
            };
            assert_eq!(effective("runAsNonRoot"), true, "{label}: runAsNonRoot");
            let uid = effective("runAsUser");
            assert!(
                uid.as_i64().is_some_and(|uid| uid > 0),
                "{label}: runAsUser must be a numeric non-root uid (the kubelet cannot check a user name), not {uid}"
            );
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{label}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{label}");
            assert_eq!(sc["privileged"], Value::Null, "{label}: privileged");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{label}");
            assert_eq!(sc["capabilities"]["add"], Value::Null, "{label}");
            assert_eq!(
                effective("seccompProfile")["type"],
                "RuntimeDefault",
                "{label}: seccompProfile"
            );
            let resources = &container["resources"];
            for path in [
                ["requests", "cpu"],
                ["requests", "memory"],
                ["limits", "memory"],
            ] {
                assert!(
                    resources[path[0]][path[1]].is_string(),
                    "{label}: resources.{}.{} is sized (README: Resources)",
                    path[0],
                    path[1]
                );
            }
        }
    }
}

/// What a probe must be.
#[derive(Clone, Copy)]
enum Probe {
    /// An HTTP GET of this path on the port the listener variable names.
    Get(&'static str),
    /// A TCP connect to the port the listener variable names.
    Tcp,
}

#[test]
fn probes_are_http_gets_of_the_status_routes_on_the_listening_ports() {
    let objects = objects();
    check_probes(
        find(&objects, "StatefulSet", "charter-cp"),
        "CHARTER_ADMIN_LISTEN",
        Probe::Get("/status"),
        Probe::Get("/status"),
    );
    check_probes(
        find(&objects, "Deployment", "charter-dp"),
        "CHARTER_STATUS_LISTEN",
        Probe::Get("/status/ready"),
        Probe::Get("/status"),
    );

    // The overlay's control planes: ready on GET /status (503 while PostgreSQL is
    // unreachable), alive while the admin port accepts connections (a database outage must
    // not restart every replica).
    let objects = ha_objects();
    check_probes(
        find(&objects, "Deployment", "charter-cp"),
        "CHARTER_ADMIN_LISTEN",
        Probe::Get("/status"),
        Probe::Tcp,
    );
    check_probes(
        find(&objects, "Deployment", "charter-dp"),
        "CHARTER_STATUS_LISTEN",
        Probe::Get("/status/ready"),
        Probe::Get("/status"),
    );
}

fn check_probes(object: &Object, listen: &str, readiness: Probe, liveness: Probe) {
    let label = object.label();
    let container = main_container(object);
    let env = env_of(container);
    let listen_port = port_of(setting(&env, listen));
    for (probe, expected) in [("readinessProbe", readiness), ("livenessProbe", liveness)] {
        let probe_value = &container[probe];
        assert!(
            probe_value["grpc"].is_null() && probe_value["exec"].is_null(),
            "{label}: {probe} is not gRPC (a gRPC probe cannot present the cluster certificate) nor exec (the image has no shell)"
        );
        let port = match expected {
            Probe::Get(path) => {
                assert!(probe_value["tcpSocket"].is_null(), "{label}: {probe}");
                let get = &probe_value["httpGet"];
                assert_eq!(get["path"], path, "{label}: {probe} path");
                assert!(
                    get["scheme"].is_null() || get["scheme"] == "HTTP",
                    "{label}: {probe} is plain HTTP"
                );
                &get["port"]
            }
            Probe::Tcp => {
                assert!(probe_value["httpGet"].is_null(), "{label}: {probe}");
                &probe_value["tcpSocket"]["port"]
            }
        };
        assert_eq!(
            container_port(container, port),
            listen_port,
            "{label}: {probe} probes the port {listen} listens on"
        );
    }
}

#[test]
fn services_volumes_and_secrets_fit_together() {
    let objects = objects();
    check_wiring(
        &objects,
        &[
            (find(&objects, "StatefulSet", "charter-cp"), "claim"),
            (find(&objects, "Deployment", "charter-dp"), "emptyDir"),
        ],
    );
    let objects = ha_objects();
    // The overlay's control planes keep nothing on disk: no data dir at all.
    check_wiring(
        &objects,
        &[(find(&objects, "Deployment", "charter-dp"), "emptyDir")],
    );
}

/// Checks that the Services reach the control plane's listeners, the data planes reach the
/// cluster Service, and every path a setting names is on a mounted volume: a Secret shown
/// in the README, or for `CHARTER_DATA_DIR` a writable volume of the kind given for the
/// workload (`claim` for a claim template).
fn check_wiring(objects: &[Object], data_volumes: &[(&Object, &str)]) {
    let cp_object = workload_running(objects, "charter-cp");
    let cp = main_container(cp_object);
    let cp_env = env_of(cp);
    let pod_labels = cp_object.pod_labels();

    // The admin API leaves loopback, so it must have its token file.
    let admin_listen = setting(&cp_env, "CHARTER_ADMIN_LISTEN");
    if !admin_listen.starts_with("127.") && !admin_listen.starts_with("[::1]") {
        setting(&cp_env, "CHARTER_ADMIN_TOKEN_FILE");
    }

    // Each Service selects the CP pods and forwards to the port the CP listens on.
    for (service, listen) in [
        ("charter-cp-admin", "CHARTER_ADMIN_LISTEN"),
        ("charter-cp-cluster", "CHARTER_CLUSTER_LISTEN"),
    ] {
        let spec = &find(objects, "Service", service).value["spec"];
        let selector = spec["selector"].as_object().expect("a selector");
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(
                &pod_labels[key], value,
                "Service {service} selects the CP pods"
            );
        }
        assert_eq!(
            container_port(cp, &spec["ports"][0]["targetPort"]),
            port_of(setting(&cp_env, listen)),
            "Service {service} forwards to {listen}"
        );
    }

    // The data planes reach the cluster Service by its DNS name: one address, which the
    // Service spreads over the control planes.
    let dp_object = workload_running(objects, "charter-dp");
    let dp = main_container(dp_object);
    let dp_env = env_of(dp);
    let control_plane = setting(&dp_env, "CHARTER_CONTROL_PLANE");
    assert!(
        !control_plane.contains(','),
        "{control_plane}: one address, the Service's"
    );
    let (host, port) = control_plane.rsplit_once(':').expect("HOST:PORT");
    let mut parts = host.split('.');
    let service = find(objects, "Service", parts.next().expect("a host"));
    if let Some(namespace) = parts.next() {
        assert_eq!(
            service.value["metadata"]["namespace"], namespace,
            "CHARTER_CONTROL_PLANE names the Service's namespace"
        );
    }
    assert_eq!(
        service.value["spec"]["ports"][0]["port"].to_string(),
        port,
        "CHARTER_CONTROL_PLANE uses the Service's port"
    );
    assert_eq!(service.name(), "charter-cp-cluster");

    // Every file or directory a setting names is on a mounted volume (the root
    // filesystem is read-only); the data dir is writable, persistent for the CP.
    let readme = fs::read_to_string(base().join("README.md")).expect("deploy/kubernetes/README.md");
    for object in workloads(objects) {
        let label = object.label();
        let container = main_container(object);
        let pod = object.pod_spec().expect("a workload");
        let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
        let volume = |name: &str| -> Value {
            let volumes = pod["volumes"].as_array().into_iter().flatten();
            let claims = object.value["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten();
            if let Some(v) = volumes.clone().find(|v| v["name"] == name) {
                return v.clone();
            }
            if claims.clone().any(|c| c["metadata"]["name"] == name) {
                return json!({"name": name, "claim": true});
            }
            panic!("{label}: volumeMount {name} has no volume")
        };
        let mount_of = |path: &str| -> &Value {
            mounts
                .iter()
                .find(|m| {
                    let mount = m["mountPath"].as_str().expect("mountPath");
                    path == mount || path.starts_with(&format!("{mount}/"))
                })
                .unwrap_or_else(|| {
                    panic!("{label}: {path} is on no mounted volume, and the root filesystem is read-only")
                })
        };
        for (name, value) in env_of(container) {
            let Some(value) = value.filter(|_| name.starts_with("CHARTER_")) else {
                continue;
            };
            for path in value.split(',').filter(|p| p.starts_with('/')) {
                let mount = mount_of(path);
                let volume = volume(mount["name"].as_str().expect("a mount name"));
                if name == "CHARTER_DATA_DIR" {
                    let kind = data_volumes
                        .iter()
                        .find(|(o, _)| std::ptr::eq(*o, object))
                        .map(|(_, kind)| *kind)
                        .unwrap_or_else(|| panic!("{label}: a data dir, where none is expected"));
                    assert!(
                        mount["readOnly"] != true && !volume[kind].is_null(),
                        "{label}: the data dir is a writable {kind} volume"
                    );
                    continue;
                }
                assert_eq!(
                    mount["readOnly"], true,
                    "{label}: {name} is on a read-only mount"
                );
                let secret = volume["secret"]["secretName"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{label}: {name} ({path}) comes from a Secret"));
                let file = Path::new(path)
                    .file_name()
                    .expect("a file")
                    .to_string_lossy();
                assert!(
                    readme.contains(&format!("create secret generic {secret}"))
                        && readme.contains(&*file),
                    "{label}: the README shows how to create Secret {secret} with {file}"
                );
            }
        }
    }
    for (object, _) in data_volumes {
        assert!(
            env_of(main_container(object)).contains_key("CHARTER_DATA_DIR"),
            "{}: sets CHARTER_DATA_DIR",
            object.label()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The HA overlay
// ---------------------------------------------------------------------------------------

#[test]
fn the_ha_overlay_shares_the_bases_files_unchanged() {
    // Kustomize refuses a base that contains the overlay, so the overlay holds copies of
    // the base's files but the control plane's: they must not drift apart.
    let overlay: BTreeSet<String> = resource_files_of(&ha()).into_iter().collect();
    assert_eq!(
        overlay,
        manifest_files(&ha()),
        "overlays/ha/kustomization.yaml resources and the manifest files of overlays/ha differ"
    );
    let shared: Vec<String> = resource_files()
        .into_iter()
        .filter(|f| f != "cp-statefulset.yaml")
        .collect();
    for file in &shared {
        assert!(
            overlay.contains(file),
            "overlays/ha does not list the base's {file}: copy it there (cp deploy/kubernetes/{file} deploy/kubernetes/overlays/ha/) and list it"
        );
        assert_eq!(
            fs::read_to_string(ha().join(file)).expect("the overlay's copy"),
            fs::read_to_string(base().join(file)).expect("the base's file"),
            "overlays/ha/{file} differs from deploy/kubernetes/{file}: copy the base's over it"
        );
    }
    let own: BTreeSet<&str> = overlay
        .iter()
        .map(String::as_str)
        .filter(|f| !shared.iter().any(|s| s == f))
        .collect();
    assert_eq!(own, BTreeSet::from(["cp-deployment.yaml", "cp-pdb.yaml"]));
    let (base_k, ha_k) = (kustomization(), kustomization_of(&ha()));
    assert_eq!(ha_k["namespace"], base_k["namespace"]);
    assert_eq!(ha_k["images"], base_k["images"]);
}

#[test]
fn the_ha_overlay_runs_three_control_planes_on_postgresql_without_a_claim() {
    let rendered = ha_objects();
    let mut labels: Vec<String> = rendered.iter().map(|o| o.label()).collect();
    labels.sort();
    for object in rendered.iter().filter(|o| o.kind() != "Namespace") {
        assert_eq!(
            object.value["metadata"]["namespace"],
            "charter",
            "{}",
            object.label()
        );
    }
    for object in &rendered {
        assert!(
            !matches!(
                object.kind(),
                "StatefulSet" | "PersistentVolumeClaim" | "Secret"
            ),
            "the overlay renders {} (rendered: {labels:?})",
            object.label()
        );
        assert!(
            object.value["spec"]["volumeClaimTemplates"].is_null(),
            "{}",
            object.label()
        );
        for container in object.pod_spec().map(containers).into_iter().flatten() {
            assert_eq!(
                container["image"],
                "charter:0.1.0",
                "{}: the overlay's images reach every container",
                object.label()
            );
        }
    }

    // Three control planes, none with anything on disk, all on the database Secret.
    let cp = find(&rendered, "Deployment", "charter-cp");
    assert_eq!(cp.value["spec"]["replicas"], 3);
    let rolling = &cp.value["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(
        rolling["maxUnavailable"], 0,
        "three serve through a rollout"
    );
    let pod = cp.pod_spec().expect("a workload");
    for volume in pod["volumes"].as_array().expect("volumes") {
        assert!(
            volume["secret"].is_object(),
            "{}: the control planes mount Secrets only: {volume}",
            cp.label()
        );
    }
    let container = main_container(cp);
    let env = env_of(container);
    for absent in ["CHARTER_DATA_DIR", "CHARTER_DATABASE_URL"] {
        assert!(
            !env.contains_key(absent),
            "{}: {absent} is not set (the URL, which holds the password, comes from a Secret file)",
            cp.label()
        );
    }
    let url_file = setting(&env, "CHARTER_DATABASE_URL_FILE");
    let (dir, file) = url_file.rsplit_once('/').expect("a path");
    assert_eq!(file, "url", "the Secret's key is `url`");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("{url_file} is in no mounted directory"));
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    assert_eq!(volume["secret"]["secretName"], "charter-database");
    assert!(
        volume["secret"]["items"].is_null(),
        "the whole Secret is mounted, so a ca.pem (or client certificate) added to it is there too"
    );

    // One per node where it can: preferred anti-affinity across hostnames.
    let terms = &pod["affinity"]["podAntiAffinity"];
    let preferred = terms["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| &t["podAffinityTerm"]);
    let required = terms["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .into_iter()
        .flatten();
    assert!(
        preferred.chain(required).any(|term| {
            term["topologyKey"] == "kubernetes.io/hostname"
                && selects(&term["labelSelector"], cp.pod_labels())
        }),
        "{}: pod anti-affinity across kubernetes.io/hostname, selecting its own pods: {terms}",
        cp.label()
    );

    // A disruption budget that keeps two of the three.
    let budgets: Vec<&Object> = rendered
        .iter()
        .filter(|o| o.kind() == "PodDisruptionBudget")
        .collect();
    assert_eq!(budgets.len(), 1, "one PodDisruptionBudget: {labels:?}");
    let budget = &budgets[0].value["spec"];
    assert!(
        selects(&budget["selector"], cp.pod_labels()),
        "the PodDisruptionBudget selects the control planes: {budget}"
    );
    let dp = find(&rendered, "Deployment", "charter-dp");
    assert!(
        !selects(&budget["selector"], dp.pod_labels()),
        "the PodDisruptionBudget selects the control planes only"
    );
    assert!(
        budget["maxUnavailable"] == 1 || budget["minAvailable"] == 2,
        "the PodDisruptionBudget keeps two of three: {budget}"
    );

    // The base's Services and data planes are there, as in the base.
    let base = objects();
    for (kind, name) in [
        ("Namespace", "charter"),
        ("Service", "charter-cp-admin"),
        ("Service", "charter-cp-cluster"),
    ] {
        assert_eq!(
            find(&rendered, kind, name).value,
            find(&base, kind, name).value,
            "{kind}/{name}"
        );
    }
    assert_eq!(dp.value["spec"]["replicas"], 2);
}

#[test]
fn the_ha_overlays_environment_runs_three_control_planes_on_one_postgresql() {
    let dir = TempDir::new().expect("temp dir");
    let dir = dir.path();
    let objects = ha_objects();
    let (mut secrets, token) = make_secrets(dir);
    let pg = TestPostgres::start();
    // A password in the URL (the test server trusts any), to show it is never printed.
    let password = "k8s-test-database-password";
    let url = pg.url().replacen(
        "postgres://charter@",
        &format!("postgres://charter:{password}@"),
        1,
    );
    assert!(url.contains(password), "{url}");
    let database = dir.join("secrets/charter-database");
    fs::create_dir_all(&database).expect("a secret dir");
    fs::write(database.join("url"), format!("{url}\n")).expect("the url file");
    secrets.insert("charter-database".to_owned(), database);

    // The three replicas start together, as a Deployment starts them: one runs the
    // migration under the advisory lock, the others wait for it.
    let cp_object = find(&objects, "Deployment", "charter-cp");
    let replicas = cp_object.value["spec"]["replicas"]
        .as_u64()
        .expect("replicas");
    let mut cps = Vec::new();
    for replica in 0..replicas {
        let mut ports = BTreeMap::new();
        let replica_dir = dir.join(format!("cp-{replica}"));
        fs::create_dir_all(&replica_dir).expect("a replica dir");
        let env = local_env(cp_object, &replica_dir, &secrets, &mut ports);
        let log = dir.join(format!("cp-{replica}.log"));
        let running = Running::start("charter-cp", &env, log, &replica_dir);
        cps.push((running, ports, replica_dir));
    }
    let admins: Vec<String> = cps
        .iter()
        .map(|(_, ports, _)| format!("http://{}", local_port(ports, 8001)))
        .collect();
    let mut epochs = BTreeSet::new();
    for ((cp, _, _), admin) in cps.iter_mut().zip(&admins) {
        let url = format!("{admin}/status");
        cp.wait_for(&url);
        let status = eventually("the replica ready", Duration::from_secs(30), || {
            let resp = http("GET", &url, None).ok()?;
            (resp.status == 200).then(|| resp.json())
        });
        epochs.insert(status["database"]["epoch"].to_string());
    }
    assert_eq!(epochs.len(), 1, "one database, one epoch: {epochs:?}");

    // The data plane reaches "the Service": the first replica here.
    let mut dp_ports = cps[0].1.clone();
    let dp_env = local_env(
        find(&objects, "Deployment", "charter-dp"),
        dir,
        &secrets,
        &mut dp_ports,
    );
    let mut dp = Running::start("charter-dp", &dp_env, dir.join("dp.log"), dir);
    let status = format!("http://{}", local_port(&dp_ports, 8100));
    dp.wait_for(&format!("{status}/status"));

    // A license added on the last replica is enforced by the data plane of the first.
    let payload = dir.join("payload.json");
    fs::write(
        &payload,
        json!({"admin_seats":"1","customer":"Kubernetes HA Test","dataplanes":"2",
               "license_creation_date":"2026-01-01","license_expiration_date":"2099-12-31",
               "license_key":"K8S-HA-0001","product_subscription":"Charter Enterprise",
               "support_plan":"None"})
        .to_string(),
    )
    .expect("payload.json");
    let signed = run(
        "charterctl",
        &[
            "sign",
            "--key",
            &dir.join("keys/signing.key").to_string_lossy(),
            &payload.to_string_lossy(),
        ],
    );
    assert!(
        signed.status.success(),
        "charterctl sign: {}",
        stderr(&signed)
    );
    let document = String::from_utf8(signed.stdout).expect("UTF-8");
    let last = admins.last().expect("replicas");
    let created = http_with_headers(
        "POST",
        &format!("{last}/licenses"),
        Some(Body::Form(vec![("payload".to_owned(), document)])),
        &[("Kong-Admin-Token", &token)],
    )
    .expect("POST /licenses");
    assert_eq!(created.status, 201, "POST /licenses: {}", created.body);
    let id = created.json()["id"].as_str().expect("an id").to_owned();
    eventually("the DP to be ready", Duration::from_secs(30), || {
        (request_status(&format!("{status}/status/ready")) == 200).then_some(())
    });
    let license = http("GET", &format!("{status}/license"), None)
        .expect("GET /license")
        .json();
    assert_eq!(license["id"], id.as_str(), "{license}");

    // Every replica lists the license and the data plane (both are in the database).
    for admin in &admins {
        eventually(
            "every replica to list the license and the data plane",
            Duration::from_secs(20),
            || {
                let licenses = get_with_token(&format!("{admin}/licenses"), &token).json();
                let planes = get_with_token(&format!("{admin}/clustering/data-planes"), &token);
                (licenses["data"][0]["id"] == id.as_str()
                    && planes.json()["data"][0]["labels"]["platform"] == "kubernetes")
                    .then_some(())
            },
        );
    }
    for (cp, _, cwd) in &cps {
        // Nothing on disk (the root filesystem is read-only and there is no volume to
        // write to): not even the default ./charter-cp-data in the working directory.
        let written: Vec<PathBuf> = fs::read_dir(cwd)
            .expect("the replica's working directory")
            .map(|e| e.expect("an entry").path())
            .collect();
        assert!(written.is_empty(), "a control plane wrote {written:?}");
        let logs = cp.logs();
        assert!(
            !logs.contains(password),
            "a control plane printed the database password:\n{logs}"
        );
        assert!(
            logs.lines().all(|l| l.starts_with('{')),
            "CHARTER_LOG_FORMAT=json: every log line is JSON:\n{logs}"
        );
    }
    drop(dp);
}
// ---------------------------------------------------------------------------------------
// Running what the manifests say
// ---------------------------------------------------------------------------------------

/// The files of each Secret, made the way deploy/kubernetes/README.md makes them.
fn make_secrets(dir: &Path) -> (BTreeMap<String, PathBuf>, String) {
    let ctl = |args: &[&str]| {
        let out = run("charterctl", args);
        assert!(
            out.status.success(),
            "charterctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let keys = dir.join("keys");
    let certs = dir.join("certs");
    ctl(&["keygen", "--out-dir", &keys.to_string_lossy()]);
    ctl(&["gen-cert", "--out-dir", &certs.to_string_lossy()]);
    let token = "k8s-test-write-token-0123456789abcdef";
    let secrets = dir.join("secrets");
    let mut made = BTreeMap::new();
    for (secret, files) in [
        (
            "charter-cluster-cert",
            vec![certs.join("cluster.crt"), certs.join("cluster.key")],
        ),
        ("charter-trusted-keys", vec![keys.join("signing.pub")]),
    ] {
        let secret_dir = secrets.join(secret);
        fs::create_dir_all(&secret_dir).expect("a secret dir");
        for file in files {
            fs::copy(
                &file,
                secret_dir.join(file.file_name().expect("a file name")),
            )
            .expect("copying a secret file");
        }
        made.insert(secret.to_owned(), secret_dir);
    }
    let tokens = secrets.join("charter-admin-tokens");
    fs::create_dir_all(&tokens).expect("a secret dir");
    fs::write(
        tokens.join("tokens"),
        format!("{token} write\nk8s-test-read-token read\n"),
    )
    .expect("the token file");
    made.insert("charter-admin-tokens".to_owned(), tokens);
    (made, token.to_owned())
}

/// The environment a workload's container gets, for a run on this machine: mount paths
/// mapped to directories under `dir`, `0.0.0.0:PORT` listeners to free loopback ports,
/// `$(VAR)` references expanded as the kubelet does. `ports` maps each listening port of
/// the manifests to the loopback address that stands for it, and grows as listeners are
/// met (so the control plane must come first).
fn local_env(
    object: &Object,
    dir: &Path,
    secrets: &BTreeMap<String, PathBuf>,
    ports: &mut BTreeMap<i64, String>,
) -> Vec<(String, String)> {
    let container = main_container(object);
    let pod = object.pod_spec().expect("a workload");
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = mount["name"].as_str().expect("a mount name");
        let path = mount["mountPath"]
            .as_str()
            .expect("a mount path")
            .to_owned();
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name);
        let local = match volume.and_then(|v| v["secret"]["secretName"].as_str()) {
            Some(secret) => secrets
                .get(secret)
                .unwrap_or_else(|| panic!("the test does not know how to make Secret {secret}"))
                .clone(),
            None => {
                let local = dir.join(format!("{}-{name}", object.name()));
                fs::create_dir_all(&local).expect("a volume dir");
                local
            }
        };
        mounts.push((path, local));
    }
    let local_path = |value: &str| -> String {
        value
            .split(',')
            .map(|item| {
                mounts
                    .iter()
                    .find_map(|(mount, local)| {
                        let rest = item.strip_prefix(mount.as_str())?;
                        (rest.is_empty() || rest.starts_with('/'))
                            .then(|| format!("{}{rest}", local.display()))
                    })
                    .unwrap_or_else(|| item.to_owned())
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for entry in container["env"].as_array().into_iter().flatten() {
        let name = entry["name"].as_str().expect("a name").to_owned();
        let Some(raw) = entry["value"].as_str() else {
            // valueFrom (the downward API): a stand-in value.
            env.push((name.clone(), format!("test-{}", name.to_lowercase())));
            continue;
        };
        let mut value = raw.to_owned();
        for (other, other_value) in &env {
            value = value.replace(&format!("$({other})"), other_value);
        }
        if let Some(port) = value.strip_prefix("0.0.0.0:") {
            let port: i64 = port.parse().expect("a port");
            value = ports
                .entry(port)
                .or_insert_with(|| format!("127.0.0.1:{}", free_port()))
                .clone();
        } else if name == "CHARTER_CONTROL_PLANE" {
            let port = port_of(&value);
            let local = ports.get(&port).expect("the control plane runs first");
            value = format!("localhost:{}", port_of(local));
        }
        env.push((name, local_path(&value)));
    }
    env
}

/// A process killed when dropped.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// Starts `binary` with exactly `env` (no other `CHARTER_*` variable) in the working
    /// directory `cwd`, its standard error to `log`.
    fn start(binary: &str, env: &[(String, String)], log: PathBuf, cwd: &Path) -> Running {
        let mut command = Command::new(bin(binary));
        command.current_dir(cwd);
        for (name, _) in std::env::vars() {
            if name.starts_with("CHARTER_") {
                command.env_remove(name);
            }
        }
        let child = command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("a log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {binary}: {e}"));
        Running { child, log }
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `GET url` answers, or panics with the logs if the process exits.
    fn wait_for(&mut self, url: &str) {
        eventually(url, Duration::from_secs(20), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the process exited ({status}); log:\n{}", self.logs());
            }
            http("GET", url, None).ok()
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get_with_token(url: &str, token: &str) -> Resp {
    http_with_headers("GET", url, None, &[("Kong-Admin-Token", token)])
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

#[test]
fn the_manifests_environment_runs_a_licensed_cluster() {
    let dir = TempDir::new().expect("temp dir");
    let dir = dir.path();
    let objects = objects();
    let (secrets, token) = make_secrets(dir);
    let mut ports = BTreeMap::new();

    let cp_env = local_env(
        find(&objects, "StatefulSet", "charter-cp"),
        dir,
        &secrets,
        &mut ports,
    );
    let mut cp = Running::start("charter-cp", &cp_env, dir.join("cp.log"), dir);
    let admin = format!("http://{}", local_port(&ports, 8001));
    cp.wait_for(&format!("{admin}/status"));

    let dp_env = local_env(
        find(&objects, "Deployment", "charter-dp"),
        dir,
        &secrets,
        &mut ports,
    );
    let mut dp = Running::start("charter-dp", &dp_env, dir.join("dp.log"), dir);
    let status = format!("http://{}", local_port(&ports, 8100));
    dp.wait_for(&format!("{status}/status"));
    let ready = || request_status(&format!("{status}/status/ready"));
    assert_eq!(ready(), 503, "the DP is not ready before any license");

    // The admin API wants the token on every route but /status.
    assert_eq!(request_status(&format!("{admin}/licenses")), 401);
    assert_eq!(
        get_with_token(&format!("{admin}/licenses"), &token).status,
        200
    );

    // A license, signed as the README signs it, added as the README adds it.
    let payload = dir.join("payload.json");
    fs::write(
        &payload,
        json!({"admin_seats":"1","customer":"Kubernetes Test","dataplanes":"2",
               "license_creation_date":"2026-01-01","license_expiration_date":"2099-12-31",
               "license_key":"K8S-0001","product_subscription":"Charter Enterprise",
               "support_plan":"None"})
        .to_string(),
    )
    .expect("payload.json");
    let signed = run(
        "charterctl",
        &[
            "sign",
            "--key",
            &dir.join("keys/signing.key").to_string_lossy(),
            &payload.to_string_lossy(),
        ],
    );
    assert!(
        signed.status.success(),
        "charterctl sign: {}",
        stderr(&signed)
    );
    let document = String::from_utf8(signed.stdout).expect("UTF-8");
    let created = http_with_headers(
        "POST",
        &format!("{admin}/licenses"),
        Some(Body::Form(vec![("payload".to_owned(), document)])),
        &[("Kong-Admin-Token", &token)],
    )
    .expect("POST /licenses");
    assert_eq!(created.status, 201, "POST /licenses: {}", created.body);
    let id = created.json()["id"].as_str().expect("an id").to_owned();

    // The data plane enforces it, and the control plane sees the data plane's labels.
    eventually("the DP to be ready", Duration::from_secs(20), || {
        (ready() == 200).then_some(())
    });
    let license = http("GET", &format!("{status}/license"), None)
        .expect("GET /license")
        .json();
    assert_eq!(license["id"], id.as_str(), "{license}");
    assert_eq!(license["source"], "cluster");
    let planes = get_with_token(&format!("{admin}/clustering/data-planes"), &token).json();
    assert_eq!(
        planes["data"][0]["labels"],
        json!({"platform": "kubernetes", "node": "test-node_name"}),
        "{planes}"
    );
    assert!(
        dp.logs().lines().all(|l| l.starts_with('{')),
        "CHARTER_LOG_FORMAT=json: every log line is JSON:\n{}",
        dp.logs()
    );
    drop(cp);
}

/// The loopback address standing for a `0.0.0.0:PORT` listener of the manifests.
fn local_port(ports: &BTreeMap<i64, String>, port: i64) -> &str {
    ports.get(&port).unwrap_or_else(|| {
        panic!("no container listens on 0.0.0.0:{port} (the Services and the README use it)")
    })
}

fn request_status(url: &str) -> u16 {
    http("GET", url, None)
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------
// Schema validation
// ---------------------------------------------------------------------------------------

/// Runs `scripts/validate-manifests [DIR]`.
fn validate_manifests(dir: Option<&Path>) -> (bool, String) {
    let mut command = Command::new(workspace_root().join("scripts/validate-manifests"));
    if let Some(dir) = dir {
        command.arg(dir);
    }
    let out = command
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/validate-manifests");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    (out.status.success(), text)
}

/// A copy of the manifest files of a kustomization directory in a temp dir, for breaking it.
fn copy_of(dir: &Path) -> TempDir {
    let copy = TempDir::new().expect("temp dir");
    for entry in fs::read_dir(dir).expect("a kustomization directory") {
        let entry = entry.expect("an entry");
        if entry.file_type().expect("a file type").is_file() {
            fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copying");
        }
    }
    copy
}

/// A copy of the base in a temp dir, for breaking it.
fn copy_of_base() -> TempDir {
    copy_of(&base())
}

/// Replaces `from` (which must be there) with `to` in a file.
fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    fs::write(path, text.replacen(from, to, 1)).expect("writing");
}

#[test]
fn validate_manifests_passes_and_catches_mistakes() {
    // First (and alone: it may install kubernetes-validate into .venv), the real base.
    let (ok, output) = validate_manifests(None);
    assert!(ok, "scripts/validate-manifests failed:\n{output}");
    assert!(
        output.contains("valid against Kubernetes") && !output.contains("WARN"),
        "{output}"
    );
    // With no argument it checks the base and every overlay, the overlay rendered.
    for line in [
        "deploy/kubernetes: 5 files, 5 objects rendered and valid",
        "deploy/kubernetes/overlays/ha: 6 files, 6 objects rendered and valid",
        "INFO deploy/kubernetes/overlays/ha/cp-deployment.yaml: Deployment/charter-cp valid",
        "INFO deploy/kubernetes/overlays/ha/cp-pdb.yaml: PodDisruptionBudget/charter-cp valid",
    ] {
        assert!(output.contains(line), "no {line:?} in:\n{output}");
    }

    // An unknown field fails strict validation.
    let copy = copy_of_base();
    let deployment = copy.path().join("dp-deployment.yaml");
    let text = fs::read_to_string(&deployment).expect("dp-deployment.yaml");
    fs::write(
        &deployment,
        text.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"),
    )
    .expect("writing");
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(!ok && output.contains("readOnlyRootFileSystem"), "{output}");

    // A manifest that kustomization.yaml does not list fails too.
    let copy = copy_of_base();
    fs::write(
        copy.path().join("extra.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  namespace: charter\n",
    )
    .expect("writing");
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(
        !ok && output.contains("extra.yaml is not listed"),
        "{output}"
    );

    // And a kind with no schema (a typo) is an error, not a warning.
    let copy = copy_of_base();
    let service = copy.path().join("cp-service-admin.yaml");
    let text = fs::read_to_string(&service).expect("cp-service-admin.yaml");
    fs::write(&service, text.replace("kind: Service", "kind: Servise")).expect("writing");
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(!ok && output.contains("Servise"), "{output}");
}

#[test]
fn validate_manifests_catches_mistakes_in_the_ha_overlay() {
    // A copy of the overlay as it is validates.
    let copy = copy_of(&ha());
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(ok, "a copy of overlays/ha:\n{output}");

    // An unknown field in the overlay's own objects fails strict validation, naming it.
    for (file, from, to) in [
        ("cp-pdb.yaml", "maxUnavailable:", "maxUnavailible:"),
        ("cp-deployment.yaml", "labelSelector:", "labelselector:"),
        ("cp-deployment.yaml", "  replicas: 3", "  replica: 3"),
    ] {
        let copy = copy_of(&ha());
        edit(&copy.path().join(file), from, to);
        let (ok, output) = validate_manifests(Some(copy.path()));
        let field = to.split(':').next().expect("a field").trim();
        assert!(
            !ok && output.contains(&format!("'{field}' was unexpected")) && output.contains(file),
            "{file} with {to}:\n{output}"
        );
    }

    // A kustomize feature the renderer does not implement is refused by name, not skipped:
    // here a strategic-merge patch carrying an unknown field.
    let copy = copy_of(&ha());
    fs::write(
        copy.path().join("replicas-patch.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: charter-cp\nspec:\n  replica: 5\n",
    )
    .expect("writing");
    edit(
        &copy.path().join("kustomization.yaml"),
        "\nimages:",
        "\npatches:\n  - path: replicas-patch.yaml\n\nimages:",
    );
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(
        !ok && output.contains("uses patches, which scripts/validate-manifests does not render"),
        "{output}"
    );

    // The base as a resource: kustomize refuses a directory that contains the overlay.
    let copy = copy_of(&ha());
    edit(
        &copy.path().join("kustomization.yaml"),
        "  - namespace.yaml",
        "  - ../..",
    );
    fs::remove_file(copy.path().join("namespace.yaml")).expect("removing");
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(!ok && output.contains("cycle detected"), "{output}");

    // An images entry that matches no container (a typo) is an error, not a no-op.
    let copy = copy_of(&ha());
    edit(
        &copy.path().join("kustomization.yaml"),
        "  - name: charter\n",
        "  - name: charter-cp\n",
    );
    let (ok, output) = validate_manifests(Some(copy.path()));
    assert!(
        !ok && output.contains("images 'charter-cp' matches no container image"),
        "{output}"
    );
}
