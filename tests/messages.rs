//! Error messages a user reads (issue 25, item 7): sizes as they are (never a count wrapped into a
//! small number), settings by name and value (never a Rust debug dump of a struct), and no Mesa
//! warning about XDG_RUNTIME_DIR in front of a command's output.

mod common;

use common::gpu;
use metaseg::nn::unet::{UNet, UNetConfig};
use metaseg::nn::vnet::{VNet, VNetConfig};
use metaseg::runner::{run, Settings};
use metaseg_autograd::{Backend, Conv3dGeometry, ConvBackend, ConvSpec, Cpu64, Shape};
use std::process::Command;

/// A message must not show a struct the way `{:?}` prints it.
fn assert_no_debug_dump(message: &str) {
    for dump in ["Config {", "Geometry {", "Spec {", "CropBox {"] {
        assert!(!message.contains(dump), "a debug dump in: {message}");
    }
}

#[test]
fn a_tensor_too_large_for_the_device_is_named_with_its_true_size() {
    // 2^31 x 2^31 x 4 elements: 2^66 bytes, which a u64 count wrapped to 0 ("needs 0 bytes").
    let shape = Shape::from([1 << 31, 1 << 31, 4]);
    let message = gpu().empty(&shape).err().unwrap().to_string();
    assert!(
        message.contains("needs 73786976294838206464 bytes"),
        "{message}"
    );
}

#[test]
fn a_huge_padding_is_an_error_on_both_backends_not_an_abort() {
    let x = ("x".to_string(), vec![1.0; 64], Shape::from([1, 8, 2, 2, 2]));
    let w = ("w".to_string(), vec![1.0; 64], Shape::from([8, 8, 1, 1, 1]));
    // 2 x 18014398509481981 + 2 overflows no usize but the output's element count overflows;
    // 1e9 fits every count but no memory (256 GB of f64 on Cpu64): the allocation aborted.
    for padding in ["padding=18014398509481981,1,1", "padding=1000000000,1,1"] {
        let settings = Settings::parse([padding]).unwrap();
        let on_cpu = run(
            &Cpu64,
            "conv3d",
            vec![x.clone(), w.clone()],
            &settings,
            None,
        );
        let on_gpu = run(
            &gpu(),
            "conv3d",
            vec![x.clone(), w.clone()],
            &settings,
            None,
        );
        for message in [on_cpu.err(), on_gpu.err()].map(|e| e.expect("an error").to_string()) {
            // Refused by the geometry (naming the op) or by the device, with the true size.
            let by_device = message.contains("bytes; the adapter");
            assert!(message.starts_with("conv3d: ") || by_device, "{message}");
            assert!(!message.contains("needs 0 bytes"), "{message}");
            assert_no_debug_dump(&message);
        }
    }
}

#[test]
fn convolution_and_network_errors_name_their_settings_not_their_structs() {
    let geometry = Conv3dGeometry::new(
        &Shape::from([1, 2, 4, 4, 4]),
        &Shape::from([3, 2, 3, 3, 3]),
        ConvSpec::default(),
    )
    .unwrap();
    let x = Cpu64.fill(&Shape::from([1, 2, 4, 4, 4]), 0.0).unwrap();
    let wrong = Cpu64.fill(&Shape::from([3, 2, 2, 2, 2]), 0.0).unwrap();
    let message = Cpu64
        .conv3d(&x, &wrong, None, &geometry)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("stride [1, 1, 1]"), "{message}");
    assert_no_debug_dump(&message);

    let vnet = VNet::new(VNetConfig {
        levels: 0,
        ..VNetConfig::default()
    });
    let message = vnet.err().unwrap().to_string();
    assert!(message.contains("levels (0)"), "{message}");
    assert_no_debug_dump(&message);
    let unet = UNet::new(UNetConfig {
        classes: 0,
        ..UNetConfig::default()
    });
    let message = unet.err().unwrap().to_string();
    assert!(message.contains("classes (0)"), "{message}");
    assert_no_debug_dump(&message);
}

#[test]
fn commands_do_not_start_with_mesas_runtime_dir_warning() {
    // Unset, and set to something that is not an absolute path: libwayland's two complaints.
    for runtime_dir in [None, Some("relative/dir")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_metaseg"));
        command.arg("info").env_remove("XDG_RUNTIME_DIR");
        if let Some(dir) = runtime_dir {
            command.env("XDG_RUNTIME_DIR", dir);
        }
        let child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
        // The private directory it made is gone with it.
        let private = std::env::temp_dir().join(format!("metaseg-runtime-{pid}"));
        assert!(!private.exists(), "{} left behind", private.display());
    }
}
