//! Scenario: the operator builds the node image (test profile) with
//! `sovereign image build`, checks it with `sovereign image verify`, flashes
//! it with `sovereign flash` (identity and API credentials), and the node
//! boots under UEFI (OVMF, TCG, no network to the host) from its dm-verity
//! root to ready services; a USB stick carrying the signed demo model is
//! imported and a tampered one refused, each stick leaving the auditor's
//! courier (verified with only the cluster CA); a client on the LAN
//! stand-in trusting only the cluster CA (curl, and the official OpenAI
//! client) asks the node's HTTPS API a question; the audit log, signed by the
//! enrolled key since its key-change record, holds the boot, the imports, the
//! request and the firewall's counters.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sovereign_vm_tests::{Boot, Link, Machine, MachineConfig};

mod support;
use support::{courier_folders, operator_kit, run, stick, wait_for_couriers, API_KEY};

/// A Python with the pinned `openai` client, in a venv under `dir`.
fn python_with_openai(dir: &Path) -> PathBuf {
    let venv = dir.join("openai-venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "openai==1.99.9"]));
    venv.join("bin/python")
}

#[test]
fn the_built_image_flashes_boots_verified_and_imports_from_a_stick() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    // The operator's keys, cluster CA, enrolled node-a, trust, the image
    // (built with `sovereign image build --profile test`) and the bundles.
    let kit = operator_kit();
    let sov = |args: &[&str]| kit.sov(&kit.dir, args);
    let verified = sov(&[
        "image",
        "verify",
        "--manifest",
        "out/node.manifest.json",
        "--key",
        "build.key.pub",
        "out/node.img",
    ]);
    assert!(verified.contains("verified"), "{verified}");
    let image_size = fs::metadata(kit.path("out/node.img")).expect("image").len();
    assert!(image_size < 500_000_000, "image is {image_size} bytes");

    // The demo model as a signed bundle on one stick, a tampered release on another.
    let good_stick = stick(d, "good.img", &[&kit.path("good/smollm2-1.0.0.sovb")]);
    let bad_stick = stick(d, "bad.img", &[&kit.path("bad/smollm2-2.0.0.sovb")]);

    // node-a: its enrolled identity and the operator's API key.
    let disk = d.join("disk.img");
    kit.flash("node-a", &disk);

    let (ring0, ring1) = (Link::new().expect("link"), Link::new().expect("link"));
    let lan_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let mut node = Machine::new(
        MachineConfig::new("node", Boot::Uefi { disk: disk.clone() })
            .link(ring0.ends().0)
            .link(ring1.ends().0)
            .lan_forward(lan_port, 8443),
    )
    .expect("machine");
    let booted = Instant::now();
    node.start().expect("start");
    node.wait_for_console(
        "sovereign-verity: root verified against",
        Duration::from_secs(300),
    )
    .expect("the initramfs opens the verified root");
    node.wait_for_console("sovereign-test-agent: ready", Duration::from_secs(300))
        .expect("agent");
    node.wait_for_unit("sovereign-audit.service", Duration::from_secs(120))
        .expect("audit daemon");
    node.wait_for_unit("nftables.service", Duration::from_secs(60))
        .expect("firewall");
    node.wait_for_unit("multi-user.target", Duration::from_secs(120))
        .expect("multi-user");
    eprintln!(
        "node: UEFI boot to services ready in {:.1} s",
        booted.elapsed().as_secs_f64()
    );
    // Units ordered after multi-user.target (utmp's runlevel record, the
    // module lock) print status lines on the console the agent shares until
    // the boot has finished; none come after.
    node.execute(
        "systemctl is-system-running --wait",
        Duration::from_secs(300),
    )
    .expect("the boot finishes");

    let wait = Duration::from_secs(60);
    let root = node
        .succeed("findmnt -rno SOURCE,FSTYPE,OPTIONS /", wait)
        .expect("root mount");
    let root: Vec<&str> = root.split_whitespace().collect();
    assert_eq!(
        root[..2],
        ["/dev/mapper/sovereign-root", "erofs"],
        "{root:?}"
    );
    assert!(root[2].split(',').any(|o| o == "ro"), "{root:?}");
    let verity = node
        .succeed("dmsetup table sovereign-root", wait)
        .expect("dm table");
    assert!(verity.contains(" verity "), "{verity}");
    let var = node
        .succeed("findmnt -no SOURCE,FSTYPE /var", wait)
        .expect("/var");
    assert!(var.contains("ext4"), "{var}");
    let ruleset = node.succeed("nft list ruleset", wait).expect("nft");
    assert!(
        ruleset.contains("table inet sovereign") && ruleset.contains("policy drop"),
        "{ruleset}"
    );
    let defaults = node.succeed(
        "cut -f2 /proc/net/route | grep -x 00000000; grep '^00000000000000000000000000000000 00 ' /proc/net/ipv6_route | grep -v ' lo$'; true",
        wait,
    );
    assert_eq!(defaults.expect("routes").trim(), "", "no default route");
    let links = node.succeed("ls /sys/class/net", wait).expect("links");
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["enp0s24", "lo", "thunderbolt0", "thunderbolt1"],
        "the LAN NIC and the two ring links"
    );
    let users = node
        .succeed(
            "stat -c %U /proc/$(systemctl show -p MainPID --value sovereign-audit.service)",
            wait,
        )
        .expect("audit daemon's user");
    assert_eq!(
        users.trim(),
        "sovereign-audit",
        "the audit daemon runs as its own user"
    );
    let write = node.execute("touch /usr/bin/x", wait).expect("touch");
    assert_ne!(write.0, 0, "the root is read-only: {}", write.1);

    // Issue 14 (12): the node is named after its enrolled identity.
    let hostname = node
        .succeed("cat /proc/sys/kernel/hostname", wait)
        .expect("host name");
    assert_eq!(hostname.trim(), "node-a", "named after its identity");
    // Issue 14 (13): /var holds data only; Ctrl-Alt-Del does nothing (the
    // console's PS/2 keyboard sends it to systemd; with -no-reboot a reboot
    // would end QEMU).
    let var_options = node
        .succeed("findmnt -no OPTIONS /var", wait)
        .expect("/var options");
    for option in ["noexec", "nosuid", "nodev"] {
        assert!(
            var_options.trim().split(',').any(|o| o == option),
            "/var lacks {option}: {var_options}"
        );
    }
    let keys: Vec<serde_json::Value> = ["ctrl", "alt", "delete"]
        .iter()
        .map(|k| serde_json::json!({"type": "qcode", "data": k}))
        .collect();
    node.qmp("send-key", serde_json::json!({ "keys": keys }))
        .expect("press Ctrl-Alt-Del");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let refused = node
            .succeed(
                "journalctl -b _PID=1 -o cat --no-pager | grep -i 'ctrl-alt-del' || true",
                wait,
            )
            .expect("journal");
        if refused.contains("masked") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "systemd never saw Ctrl-Alt-Del: {refused}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(node.is_running(), "Ctrl-Alt-Del did not reboot the node");

    // Issue 14 (11): once the node is up, no kernel module loads (what
    // sticks and Thunderbolt cables need was loaded at boot) ...
    node.wait_for_unit("sovereign-lock-modules.service", Duration::from_secs(300))
        .expect("module loading locked after boot");
    let preloaded = node
        .succeed(
            "systemctl is-active systemd-modules-load.service; \
             for m in usb_storage vfat exfat thunderbolt_net; do test -d /sys/module/$m && echo $m; done; \
             cat /proc/sys/kernel/modules_disabled; modinfo -n dummy",
            wait,
        )
        .expect("preloaded modules");
    let words: Vec<&str> = preloaded.split_whitespace().collect();
    assert_eq!(
        words.get(..6),
        Some(
            &[
                "active",
                "usb_storage",
                "vfat",
                "exfat",
                "thunderbolt_net",
                "1"
            ][..]
        ),
        "{preloaded}"
    );
    let late = node.execute("modprobe dummy", wait).expect("modprobe");
    assert_ne!(late.0, 0, "a module loaded after boot: {}", late.1);
    // ... and a USB network adapter and a USB keyboard are not authorized:
    // no driver binds to them, no network interface or input device appears
    // (the sticks plugged after them still import).
    for (driver, id) in [("usb-net", "usbnet0"), ("usb-kbd", "usbkbd0")] {
        node.qmp(
            "device_add",
            serde_json::json!({ "driver": driver, "bus": "xhci.0", "id": id }),
        )
        .unwrap_or_else(|e| panic!("plug {driver}: {e}"));
    }
    const USB_DEVICES: &str = "udevadm settle; for d in /sys/bus/usb/devices/*; do \
        [ -f $d/idVendor ] && echo $(cat $d/idVendor):$(cat $d/idProduct) \
        authorized=$(cat $d/authorized) interfaces=$(ls -d $d/*:* 2>/dev/null | wc -l); done; true";
    let deadline = Instant::now() + Duration::from_secs(60);
    let devices = loop {
        let devices = node.succeed(USB_DEVICES, wait).expect("usb devices");
        // QEMU's usb-net is 0525:a4a2, its usb-kbd 0627:0001.
        if devices.contains("0525:a4a2") && devices.contains("0627:0001") {
            break devices;
        }
        assert!(
            Instant::now() < deadline,
            "the USB devices never appeared: {devices}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    for device in ["0525:a4a2", "0627:0001"] {
        assert!(
            devices.contains(&format!("{device} authorized=0 interfaces=0")),
            "{device} is authorized: {devices}"
        );
    }
    let after = node
        .succeed(
            "ls /sys/class/net; readlink -f /sys/class/input/* | grep -c /usb; true",
            wait,
        )
        .expect("links");
    assert_eq!(
        after.split_whitespace().collect::<Vec<_>>(),
        ["enp0s24", "lo", "thunderbolt0", "thunderbolt1", "0"],
        "no USB network interface, no USB input device"
    );
    // The LAN is the PCI NIC networkd matched, in the group the firewall opens.
    let lan = node
        .succeed(
            "udevadm info -q property /sys/class/net/enp0s24 | grep -x ID_BUS=pci; \
             cat /sys/class/net/enp0s24/netdev_group",
            wait,
        )
        .expect("LAN link");
    assert!(
        lan.split_whitespace().collect::<Vec<_>>() == ["ID_BUS=pci", "10"],
        "{lan}"
    );

    // A stick with a signed bundle: mounted read-only, imported, unmounted.
    let good_id = node.attach_stick(&good_stick).expect("plug the good stick");
    node.wait_for_unit("sovereign-stick@sda.service", Duration::from_secs(120))
        .expect("the stick unit ran");
    let models = node
        .succeed("ls /var/lib/sovereign/store/models/smollm2", wait)
        .expect("store");
    assert!(models.contains("1.0.0"), "{models}");
    // The stick unit's own mount options on a real FAT stick under the
    // node's kernel: read-only with nothing executed, no device nodes, no
    // set-id and no link followed, and so is the courier's read-write step.
    let options = node
        .succeed(
            "unit=/usr/lib/systemd/system/sovereign-stick@.service; \
             mount_args=$(sed -n 's|^ExecStart=/usr/bin/mount \\(-t .*\\) /dev/%i .*|\\1|p' $unit); \
             remount_args=$(sed -n 's|^ExecStopPost=-/usr/bin/mount \\(-o remount[^ ]*\\) .*|\\1|p' $unit); \
             mkdir -p /run/stick-check && mount $mount_args /dev/sda /run/stick-check && \
             findmnt -no OPTIONS /run/stick-check && mount $remount_args /run/stick-check && \
             findmnt -no OPTIONS /run/stick-check; umount /run/stick-check",
            wait,
        )
        .expect("the stick unit's mount options");
    let options: Vec<Vec<&str>> = options
        .lines()
        .map(|l| l.trim().split(',').collect())
        .collect();
    assert_eq!(options.len(), 2, "{options:?}");
    for (mounted, mode) in options.iter().zip(["ro", "rw"]) {
        for option in [mode, "nosuid", "nodev", "noexec", "nosymfollow"] {
            assert!(mounted.contains(&option), "{option}: {options:?}");
        }
    }
    let bad_id = node
        .attach_stick(&bad_stick)
        .expect("plug the tampered stick");
    let error = node
        .wait_for_unit("sovereign-stick@sdb.service", Duration::from_secs(120))
        .expect_err("the tampered bundle is refused");
    assert!(error.to_string().contains("failed"), "{error}");
    let journal = node
        .succeed(
            "journalctl -b -u sovereign-import@sdb.service --no-pager -o cat",
            wait,
        )
        .expect("journal");
    assert!(journal.contains("error:"), "{journal}");
    let models = node
        .succeed("ls /var/lib/sovereign/store/models/smollm2", wait)
        .expect("store");
    assert_eq!(
        models.split_whitespace().collect::<Vec<_>>(),
        ["1.0.0"],
        "the store is unchanged"
    );
    let mounts = node
        .succeed("findmnt -rn -o TARGET | grep sovereign/stick || true", wait)
        .expect("mounts");
    assert_eq!(mounts.trim(), "", "sticks are unmounted after the import");

    // Every stick became the auditor's courier; on its second visit the good
    // stick also gets the proof that the log only grew since the first. The
    // auditor holds only the cluster CA: the folder carries the node certificate.
    node.detach_stick(&good_id).expect("unplug");
    node.detach_stick(&bad_id).expect("unplug");
    let again = node
        .attach_stick(&good_stick)
        .expect("plug the good stick again");
    // Three couriers written, and the stick unmounted again (safe to unplug).
    wait_for_couriers(&mut node, 3, Duration::from_secs(120));
    node.detach_stick(&again).expect("unplug");
    for (image, visits) in [(&good_stick, "second"), (&bad_stick, "first")] {
        let folders = courier_folders(image, &d.join(format!("courier-{visits}")));
        // The folder is the node's enrolled name: two nodes never collide.
        let folder = folders.join("node-a");
        let verified = kit.verify_audit(&folder);
        assert!(
            verified.contains("ok: courier checkpoint") && verified.contains("of node node-a"),
            "{verified}"
        );
        let proof: serde_json::Value = serde_json::from_slice(
            &fs::read(folder.join("consistency-proof.json")).expect("proof"),
        )
        .expect("json");
        let old_size = proof["old_size"].as_u64().expect("old size");
        if visits == "second" {
            assert!(
                old_size > 0 && folder.join("previous-checkpoint").is_file(),
                "{proof}"
            );
        } else {
            assert_eq!(old_size, 0, "a first visit has nothing to extend: {proof}");
        }
    }

    // The imported model went live, so the API came up on the LAN over TLS
    // with the CA-issued certificate: a client that trusts only the cluster
    // CA asks node-a a question.
    let api = format!("https://node-a:{lan_port}");
    let resolve = format!("node-a:{lan_port}:127.0.0.1");
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--tlsv1.3",
                "--resolve",
                &resolve,
                "--cacert",
            ])
            .arg(kit.path("cluster/ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {API_KEY}")])
            .args(args)
            .output()
            .expect("run curl")
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let health = curl(&["--max-time", "10", &format!("{api}/health")]);
        if health.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API did not come up: {}\n{}",
            String::from_utf8_lossy(&health.stderr),
            node.succeed(
                "journalctl -b -u sovereign-api.service --no-pager -o cat | tail -20",
                wait
            )
            .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    let unauthorised = Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
            "--resolve",
            &resolve,
            "--cacert",
        ])
        .arg(kit.path("cluster/ca.pem"))
        .arg(format!("{api}/v1/models"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&unauthorised.stdout),
        "401",
        "a key is required"
    );
    let asked = Instant::now();
    let answer = curl(&[
        "--max-time",
        "900",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}"#,
        &format!("{api}/v1/completions"),
    ]);
    let answer: serde_json::Value = serde_json::from_slice(&answer.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&answer.stdout)));
    let text = answer["choices"][0]["text"].as_str().unwrap_or_default();
    eprintln!(
        "node answered {text:?} in {:.1} s (TCG): {answer}",
        asked.elapsed().as_secs_f64()
    );
    assert!(
        text.contains("Paris"),
        "greedy, the demo model knows: {answer}"
    );
    assert!(
        answer["usage"]["completion_tokens"].as_u64() >= Some(1),
        "{answer}"
    );

    // The official OpenAI client, configured with the cluster CA alone, lists
    // the node's models (generation under TCG is what curl measured above).
    const LIST_MODELS: &str = "import ssl, sys, httpx, openai\n\
        ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
        c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[3], http_client=httpx.Client(verify=ctx))\n\
        print([m.id for m in c.models.list()])\n";
    let listed = run(Command::new(python_with_openai(d))
        .args([
            "-c",
            LIST_MODELS,
            &format!("https://127.0.0.1:{lan_port}/v1"),
        ])
        .arg(kit.path("cluster/ca.pem"))
        .arg(API_KEY));
    assert!(listed.contains("smollm2"), "{listed}");

    // The LAN has its DHCP address by now, and still no route beyond it.
    let routes = node.succeed("cat /proc/net/route", wait).expect("routes");
    assert!(
        routes.contains("enp0s24"),
        "the LAN is configured: {routes}"
    );
    assert!(
        !routes
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("00000000")),
        "no default route from DHCP: {routes}"
    );

    // The firewall's drop counters reach the audit log (the timer's unit, run now).
    node.succeed(
        "systemctl start sovereign-firewall-audit.service || \
         { journalctl -b -u sovereign-firewall-audit.service --no-pager -o cat; exit 1; }",
        wait,
    )
    .expect("the firewall's counters are recorded");

    // The audit log: the boot (image version, verity root hash), both imports, the counters.
    let records = node
        .succeed("cat /var/lib/sovereign/audit/records.jsonl", wait)
        .expect("audit");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(kit.path("out/node.manifest.json")).expect("manifest"))
            .expect("json");
    let root_hash = manifest["verity_root_hash"].as_str().expect("root hash");
    assert!(
        records.contains("\"boot\"") && records.contains(root_hash),
        "{records}"
    );
    assert!(records.contains("\"outcome\":\"imported\""), "{records}");
    assert!(records.contains("\"outcome\":\"rejected\""), "{records}");
    assert!(
        records.contains("\"key-change\""),
        "the raw key hands the log to the enrolled key: {records}"
    );
    assert!(
        records.contains("\"api-request\""),
        "the API request is audited: {records}"
    );
    assert!(
        !records.contains("capital of France"),
        "never the prompt text"
    );
    assert!(
        records.contains("\"drop-counters\"") && records.contains("\"egress-drops\""),
        "{records}"
    );
    let status = node.shutdown(Duration::from_secs(120)).expect("powers off");
    assert!(status.success(), "{status}");
}
