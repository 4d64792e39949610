//! The checked-in CRDs are exactly what the Rust types generate.

use embed_url_operator::crd::crd_files;
use std::path::Path;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, generated) in crd_files().expect("render CRDs") {
        for dir in ["crds", "charts/embed-url-operator/crds"] {
            let file = root.join(dir).join(name);
            let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
            assert!(
                checked_in == generated,
                "{} differs from the Rust types: run `cargo run -- crd --output-dir crds` and \
                 `cp crds/*.yaml charts/embed-url-operator/crds/`",
                file.display()
            );
        }
        // Deleting a CRD deletes every request and, through them, every Secret: Helm and Argo
        // CD are asked never to.
        let crd: serde_json::Value = serde_yaml_ng::from_str(
            generated
                .split_once("---\n")
                .map_or(generated.as_str(), |(_, yaml)| yaml),
        )
        .expect("CRD YAML");
        let annotations = &crd["metadata"]["annotations"];
        assert_eq!(annotations["helm.sh/resource-policy"], "keep", "{name}");
        assert_eq!(
            annotations["argocd.argoproj.io/sync-options"], "Prune=false,Delete=false",
            "{name}"
        );
    }
}

#[test]
fn crd_carries_every_schema_rule() {
    let yaml = crd_files().expect("render CRDs").remove(0).1;
    let crd: serde_json::Value = serde_yaml_ng::from_str(
        yaml.split("\n---\n")
            .nth(1)
            .expect("one YAML document after the header"),
    )
    .expect("parse CRD");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "eur");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Service", "Ready", "Secret", "Expires", "Age"]);

    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let props = &spec["properties"];
    assert_eq!(
        props["quickSight"]["properties"]["awsAccountId"]["pattern"],
        "^[0-9]{12}$"
    );
    assert_eq!(
        props["quickSight"]["properties"]["sessionLifetimeInMinutes"]["minimum"],
        15.0
    );
    assert_eq!(
        props["quickSight"]["properties"]["sessionLifetimeInMinutes"]["maximum"],
        600.0
    );
    assert!(props["quickSight"]["properties"]["entryPoint"]["pattern"].is_string());
    assert_eq!(
        props["qBusiness"]["properties"]["sessionDurationInMinutes"]["maximum"],
        60.0
    );
    assert!(props["qBusiness"]["properties"]["applicationId"]["pattern"].is_string());
    assert_eq!(
        props["flink"]["properties"]["urlType"]["enum"],
        serde_json::json!(["FLINK_DASHBOARD_URL", "ZEPPELIN_UI_URL"])
    );
    assert_eq!(
        props["flink"]["properties"]["sessionExpirationDurationInSeconds"]["minimum"],
        1800.0
    );
    assert!(props["refreshBefore"]["pattern"].is_string());
    assert!(props["region"]["pattern"].is_string());
    let rules: Vec<&str> = spec["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert!(
        rules.iter().any(|r| r.contains("filter(x, x).size() == 1")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.contains("duration(self.refreshBefore) <")),
        "{rules:?}"
    );
    // Every spec field is documented, so `kubectl explain` reads like a manual.
    for (name, field) in props.as_object().unwrap() {
        assert!(
            field["description"].is_string(),
            "spec.{name} has no description"
        );
        if let Some(nested) = field["properties"].as_object() {
            for (inner, f) in nested {
                assert!(
                    f["description"].is_string(),
                    "spec.{name}.{inner} has no description"
                );
            }
        }
    }
}

#[test]
fn examples_are_valid_requests() {
    use embed_url_operator::crd::EmbedUrlRequest;
    use embed_url_operator::validation::{UseByWindows, validate};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["quicksight.yaml", "qbusiness.yaml", "flink.yaml"] {
        let text = std::fs::read_to_string(root.join("examples").join(file)).unwrap();
        let request: EmbedUrlRequest =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let name = request.metadata.name.clone().unwrap();
        validate(&request.spec, &name, &UseByWindows::documented())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    // Each example policy allows its example (as README says), in the example's namespace.
    use embed_url_operator::policy::{Ask, Decision, EmbedUrlPolicy, PolicyMode, decide};
    let read = |file: &str| std::fs::read_to_string(root.join("examples").join(file)).unwrap();
    for (policy_file, request_file) in [
        ("policy.yaml", "quicksight.yaml"),
        ("policy-qbusiness.yaml", "qbusiness.yaml"),
        ("policy-flink.yaml", "flink.yaml"),
    ] {
        let policy: EmbedUrlPolicy = serde_yaml_ng::from_str(&read(policy_file)).unwrap();
        let request: EmbedUrlRequest = serde_yaml_ng::from_str(&read(request_file)).unwrap();
        let name = request.metadata.name.clone().unwrap();
        let namespace = request.metadata.namespace.clone().unwrap();
        let spec = validate(&request.spec, &name, &UseByWindows::documented()).unwrap();
        let ask = Ask {
            namespace: &namespace,
            namespace_labels: &Default::default(),
            namespace_known: true,
            target: &spec.target,
            region: spec.region.as_deref(),
            operator_region: None,
        };
        assert!(
            matches!(
                decide(&[&policy], &ask, PolicyMode::Enforce),
                Decision::Allowed { .. }
            ),
            "{policy_file} does not allow {request_file}"
        );
    }
}
