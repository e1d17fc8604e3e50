# NixOS module: services.zeta-agents.
#
#   services.zeta-agents = {
#     enable = true;
#     personas.otto.file = ./otto.yaml;   # its key made by `zeta-agent keygen otto --write`
#   };
#
# Personas, policies and fleet.yaml are rendered into /etc/zeta (checked with
# `zeta-agent validate` at build time), each persona gets a static system user, the
# instance zeta-agent@<name> of the package's template unit (a drop-in only:
# overrideStrategy = "asDropin"), and polkit rules rendered from its scopes by
# `zeta-agent render polkit`. Secrets never enter the Nix store: credentials are
# paths on the host, read by systemd's LoadCredential= when the unit starts.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.zeta-agents;
  yaml = pkgs.formats.yaml { };
  json = pkgs.formats.json { };
  option = "services.zeta-agents";

  # The patterns the agent enforces (bus/subjects.py, runtime/model/formats.py), checked
  # here so that a bad name is an assertion naming the option, not a shell word in a
  # build script (every name also goes through escapeShellArg below).
  personaName = "[a-z][a-z0-9-]{0,25}";
  policyName = "[a-z0-9][a-z0-9-]{0,62}";
  templateName = "[A-Za-z0-9][A-Za-z0-9._-]*\\.j2";
  badNames = pattern: names: lib.filter (n: builtins.match pattern n == null) names;

  # nats-server keys the rendered configuration owns: one given in bus.settings would
  # replace the generated block (every persona user dropped, or the store moved).
  ownedBusKeys = [ "authorization" "accounts" "jetstream" "no_auth_user" ];
  stateRoot = "/var/lib/";
  sh = lib.escapeShellArg;
  id = lib.strings.escapeNixIdentifier;  # an attribute name as an option path shows it

  document = kind: name: spec: {
    apiVersion = "zeta/v1";
    inherit kind spec;
    metadata.name = name;
  };

  personaFile = name: persona:
    if persona.file != null then persona.file
    else yaml.generate "${name}.yaml" (document "Persona" name persona.settings);

  policyFile = name: spec: yaml.generate "${name}.yaml" (document "RepairPolicy" name spec);

  # Which option each file of /etc/zeta comes from, printed when validation fails: the
  # build log shows store paths, the operator edits options.
  legend = lib.concatStringsSep "\n" (
    lib.mapAttrsToList (name: persona: "personas/${name}.yaml: ${option}.personas.${id name}."
      + (if persona.file != null then "file" else "settings")) cfg.personas
    ++ lib.mapAttrsToList (name: _: "policies/${name}.yaml: ${option}.policies.${id name}")
      cfg.policies
    ++ lib.mapAttrsToList (name: _: "personas/${name}: ${option}.prompts.${id name}") cfg.prompts
    ++ [ "fleet.yaml: ${option}.fleet" ]);

  # /etc/zeta as one store path: shipped policies (unless turned off), the configured
  # ones over them, personas with the prompt templates a model brain reads beside them,
  # and fleet.yaml; refused at build time if invalid.
  configDir = pkgs.runCommand "zeta-config" { nativeBuildInputs = [ cfg.package ]; } ''
    mkdir -p $out/personas $out/policies
    ${lib.optionalString cfg.shippedPolicies
      "cp ${cfg.package}/share/zeta-agent/policies/*.yaml $out/policies/"}
    cp ${cfg.package}/share/zeta-agent/personas/*.prompt.j2 $out/personas/
    ${lib.concatStrings (lib.mapAttrsToList
      (name: file: "cp ${file} $out/personas/${sh name}\n") cfg.prompts)}
    ${lib.concatStrings (lib.mapAttrsToList
      (name: spec: "cp ${policyFile name spec} $out/policies/${sh "${name}.yaml"}\n")
      cfg.policies)}
    ${lib.concatStrings (lib.mapAttrsToList
      (name: persona: "cp ${personaFile name persona} $out/personas/${sh "${name}.yaml"}\n")
      cfg.personas)}
    cp ${yaml.generate "fleet.yaml" (document "Fleet" "fleet" cfg.fleet)} $out/fleet.yaml
    if ! zeta-agent validate $out; then
      echo "The files above come from these options:" >&2
      echo ${sh legend} >&2
      exit 1
    fi
  '';

  # Rendered from the same configuration the agents read, with the same code.
  rendered = pkgs.runCommand "zeta-rendered" { nativeBuildInputs = [ cfg.package ]; } ''
    mkdir -p $out
    zeta-agent render polkit --all --config-dir ${configDir} -o $out/polkit.rules
    zeta-agent render nats --config-dir ${configDir} \
      --listen ${lib.escapeShellArg cfg.bus.settings.listen} \
      --store-dir ${lib.escapeShellArg cfg.bus.settings.store_dir} -o $out/nats.conf
    echo 'include "nats-extra.json"' >> $out/nats.conf
  '';

  busExtra = json.generate "nats-extra.json"
    (builtins.removeAttrs cfg.bus.settings [ "listen" "store_dir" ]);

  personaOptions = { name, ... }: {
    options = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Whether zeta-agent@${name} runs (false keeps its user and rules).";
      };
      file = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "A persona YAML file (apiVersion zeta/v1, kind Persona); holds no secret.";
      };
      settings = lib.mkOption {
        type = lib.types.nullOr yaml.type;
        default = null;
        example = lib.literalExpression ''
          {
            displayName = "Otto"; role = "coordinator"; tier = "propose";
            identity = { nkey = "UA…"; kubernetes.user = "zeta-otto"; };
            scopes = [ "host:units:restart:k3s.service" ];
            duties = [ "propose" "vote" "execute" ];
            policies = [ "apiserver-unreachable" ];
          }
        '';
        description = ''
          The persona's spec, rendered to /etc/zeta/personas/${name}.yaml (freeform: the
          fields of a Persona's spec, see docs/configuration.md). Give this or file.
        '';
      };
      credentials = lib.mkOption {
        type = lib.types.attrsOf (lib.types.strMatching "/.*");
        default = { "nkey.seed" = "/etc/zeta/credentials/${name}/nkey.seed"; };
        example = {
          "nkey.seed" = "/run/secrets/zeta-otto-seed";
          kubeconfig = "/run/secrets/zeta-otto-kubeconfig";
        };
        description = ''
          Credential name (nkey.seed, kubeconfig, anthropic-api-key) to an absolute path on
          the host, passed with LoadCredential=. Strings, not Nix paths, so that no secret
          is ever copied into the world-readable store.
        '';
      };
      serviceConfig = lib.mkOption {
        type = lib.types.attrsOf lib.types.anything;
        default = { };
        example = { MemoryMax = "256M"; };
        description = "Extra [Service] settings of this instance (limits, for example).";
      };
    };
  };
in
{
  options.services.zeta-agents = {
    enable = lib.mkEnableOption "the Zeta out-of-band repair agents";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The zeta-agent package (its units are installed from it).";
    };

    personas = lib.mkOption {
      type = lib.types.attrsOf (lib.types.submodule personaOptions);
      default = { };
      description = "Personas to run on this host, by name (the systemd instance name).";
    };

    policies = lib.mkOption {
      type = lib.types.attrsOf yaml.type;
      default = { };
      description = "RepairPolicy specs by name, rendered to /etc/zeta/policies/<name>.yaml.";
    };

    prompts = lib.mkOption {
      type = lib.types.attrsOf lib.types.path;
      default = { };
      example = lib.literalExpression ''{ "nova.prompt.j2" = ./nova.prompt.j2; }'';
      description = ''
        Prompt templates (file name to file) installed in /etc/zeta/personas next to the
        persona files, for personas with the Anthropic brain; the shipped templates
        (base, vote, incident and one per shipped persona) are always installed.
      '';
    };

    shippedPolicies = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Install the policies shipped with the package (policies override them).";
    };

    fleet = lib.mkOption {
      type = yaml.type;
      default = { };
      description = "The Fleet spec (bus URLs, operators, quorum, API servers) for fleet.yaml.";
    };

    generated = lib.mkOption {
      type = lib.types.attrsOf lib.types.anything;
      internal = true;
      readOnly = true;
      description = ''
        What the module builds: the /etc/zeta tree (configDir), the files rendered from it
        (rendered: polkit.rules, nats.conf) and the bus's extra settings (busExtra). For
        tests, and for a check that wants to run `zeta-agent` on them.
      '';
    };

    bus = {
      enable = lib.mkEnableOption "zeta-bus, nats-server with JetStream, on this host";
      settings = lib.mkOption {
        type = lib.types.submodule {
          freeformType = json.type;
          options = {
            listen = lib.mkOption {
              type = lib.types.str;
              default = "127.0.0.1:4222";
              description = "Client address (HOST:PORT).";
            };
            store_dir = lib.mkOption {
              type = lib.types.str;
              default = "/var/lib/zeta-bus";
              description = ''
                JetStream's store, under /var/lib: it becomes a StateDirectory= of
                zeta-bus.service, the only place its DynamicUser= may write.
              '';
            };
          };
        };
        default = { };
        description = ''
          nats-server settings. Users and permissions are rendered from the personas by
          `zeta-agent render nats`; anything else here (cluster routes, TLS) is added to it.
        '';
      };
    };
  };

  config = lib.mkIf cfg.enable {
    services.zeta-agents.generated = { inherit configDir rendered busExtra; };

    assertions = lib.mapAttrsToList (name: persona: {
      assertion = (persona.file == null) != (persona.settings == null);
      message = "${option}.personas.${name}: set exactly one of file and settings";
    }) cfg.personas
    ++ map (name: {
      assertion = false;
      message = "${option}.personas.${id name}: a persona name is lowercase "
        + "letters, digits and '-', starting with a letter, at most 26 characters (it is "
        + "the systemd instance name and part of the user name zeta-<name>)";
    }) (badNames personaName (lib.attrNames cfg.personas))
    ++ map (name: {
      assertion = false;
      message = "${option}.policies.${id name}: a policy name is lowercase "
        + "letters, digits and '-', at most 63 characters";
    }) (badNames policyName (lib.attrNames cfg.policies))
    ++ map (name: {
      assertion = false;
      message = "${option}.prompts.${id name}: a template file name ends in "
        + ".j2 and holds no '/'";
    }) (badNames templateName (lib.attrNames cfg.prompts))
    ++ [
      {
        # An empty user list is no authorization at all to nats-server: anyone could
        # connect and freeze the fleet (`zeta-agent render nats` refuses it too).
        assertion = !cfg.bus.enable || cfg.personas != { };
        message = "${option}.bus.enable: the bus needs at least one persona in "
          + "${option}.personas; without users nats-server would let anyone connect";
      }
      {
        assertion = lib.hasPrefix stateRoot cfg.bus.settings.store_dir
          && builtins.match ".*(^|/)\\.\\.?(/.*|$)" cfg.bus.settings.store_dir == null
          && cfg.bus.settings.store_dir != stateRoot;
        message = "${option}.bus.settings.store_dir: ${cfg.bus.settings.store_dir} is not "
          + "a directory under /var/lib; zeta-bus.service (DynamicUser=) can write only "
          + "its StateDirectory=";
      }
    ]
    ++ map (key: {
      assertion = false;
      message = "${option}.bus.settings.${key}: rendered from the personas by "
        + "`zeta-agent render nats`; a value here would replace it (users dropped, or "
        + "the JetStream store moved). Use ${option}.bus.settings.store_dir for the store.";
    }) (lib.filter (key: cfg.bus.settings ? ${key}) ownedBusKeys);

    environment.etc = {
      "zeta/personas".source = "${configDir}/personas";
      "zeta/policies".source = "${configDir}/policies";
      "zeta/fleet.yaml".source = "${configDir}/fleet.yaml";
      # polkitd reads /etc/polkit-1/rules.d (security.polkit writes 10-nixos.rules there).
      "polkit-1/rules.d/60-zeta-agents.rules".source = "${rendered}/polkit.rules";
    } // lib.optionalAttrs cfg.bus.enable {
      "zeta/nats.conf".source = "${rendered}/nats.conf";
      "zeta/nats-extra.json".source = busExtra;
    };

    security.polkit.enable = true;

    users.groups = { zeta = { }; }
      // lib.mapAttrs' (name: _: lib.nameValuePair "zeta-${name}" { }) cfg.personas;
    users.users = lib.mapAttrs' (name: _: lib.nameValuePair "zeta-${name}" {
      isSystemUser = true;
      group = "zeta-${name}";
      extraGroups = [ "zeta" ];
      home = "/var/lib/zeta-agent/${name}";
      description = "Zeta agent ${name}";
    }) cfg.personas;

    # The template zeta-agent@.service, zeta-agents.target and zeta-bus.service come
    # from the package, exactly as on any other distribution.
    systemd.packages = [ cfg.package ];
    systemd.tmpfiles.packages = [ cfg.package ];

    systemd.targets.zeta-agents.wantedBy = [ "multi-user.target" ];

    systemd.services = lib.mapAttrs' (name: persona: lib.nameValuePair "zeta-agent@${name}" {
      overrideStrategy = "asDropin";
      wantedBy = lib.optional persona.enable "zeta-agents.target";
      restartTriggers = [ configDir ];
      serviceConfig = {
        # Reset the template's list: these are all the credentials the persona has.
        LoadCredential = [ "" ]
          ++ lib.mapAttrsToList (id: path: "${id}:${path}") persona.credentials;
      } // persona.serviceConfig;
    }) cfg.personas // lib.optionalAttrs cfg.bus.enable {
      zeta-bus = {
        overrideStrategy = "asDropin";
        wantedBy = [ "multi-user.target" ];
        reloadTriggers = [ rendered busExtra ];
        # The store, wherever under /var/lib it is, owned and writable by the unit.
        serviceConfig.StateDirectory = lib.unique [ "zeta-bus"
          (lib.removePrefix stateRoot cfg.bus.settings.store_dir) ];
      };
    };
  };
}
