//! Every WGSL file is parsed and validated by naga, with no GPU: a typo fails here, not at run time.

use metaseg::gpu::KernelFile;

#[test]
fn every_kernel_file_parses_and_validates() {
    for file in KernelFile::ALL {
        let module = naga::front::wgsl::parse_str(file.source())
            .unwrap_or_else(|e| panic!("{}: {}", file.name(), e.emit_to_string(file.source())));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", file.name(), e.emit_to_string(file.source())));
        assert!(
            !module.entry_points.is_empty(),
            "{} has no entry point",
            file.name()
        );
    }
}

#[test]
fn every_file_in_kernels_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let registered: Vec<&str> = KernelFile::ALL.iter().map(|f| f.name()).collect();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") {
            assert!(
                registered.contains(&name.as_str()),
                "{name} is not in KernelFile::ALL"
            );
        }
    }
}
