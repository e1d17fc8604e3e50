# The zeta-agent Python application, with the shipped personas, policies and systemd
# units under share/zeta-agent, and the units under lib/systemd/system with their
# binaries pointing into the store (the module installs them with systemd.packages).
{ lib, python3Packages, nats-server }:

python3Packages.buildPythonApplication {
  pname = "zeta-agent";
  version = "0.1.0";
  pyproject = true;

  # Only the product: the private lab (lab/) is its own distribution and never builds here.
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../.;
    filter = path: _type: baseNameOf path != "lab" || dirOf path != toString ../.;
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = [
    python3Packages.pydantic
    python3Packages.kubernetes
    python3Packages.nats-py
    python3Packages.nkeys
    python3Packages.structlog
    python3Packages.jinja2
    python3Packages.anthropic
    python3Packages.ruamel-yaml
    python3Packages.urllib3
    python3Packages.pynacl
    python3Packages.prometheus-client
    python3Packages.shtab
    python3Packages.cronsim
  ];

  postInstall = ''
    mkdir -p $out/share/zeta-agent $out/share/doc/zeta-agent $out/lib/systemd/system \
      $out/lib/tmpfiles.d
    cp -r personas policies $out/share/zeta-agent/
    cp docs/*.md $out/share/doc/zeta-agent/
    cp systemd/zeta-agent@.service systemd/zeta-agents.target systemd/zeta-bus.service \
      $out/lib/systemd/system/
    cp systemd/tmpfiles.d/zeta-agent.conf $out/lib/tmpfiles.d/
    substituteInPlace $out/lib/systemd/system/zeta-agent@.service \
      --replace-fail /opt/zeta-agent/bin/zeta-agent $out/bin/zeta-agent
    substituteInPlace $out/lib/systemd/system/zeta-bus.service \
      --replace-fail /opt/zeta-agent/bin/nats-server ${nats-server}/bin/nats-server
    # Documentation= names the docs where a plain host installs them.
    substituteInPlace $out/lib/systemd/system/*.service $out/lib/systemd/system/*.target \
      --replace-quiet file:/usr/share/doc/zeta-agent file:$out/share/doc/zeta-agent
  '';

  # The test suite starts nats-server, a Kubernetes control plane and systemd
  # containers: it runs in the project's CI, not in the sandbox of a Nix build.
  doCheck = false;
  pythonImportsCheck = [ "runtime" "bus" ];

  meta = {
    description = "Out-of-band repair agents for Kubernetes, as systemd units with quorum";
    license = lib.licenses.asl20;
    mainProgram = "zeta-agent";
    platforms = lib.platforms.linux;
  };
}
