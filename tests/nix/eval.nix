# Evaluates nix/module.nix with the real nixpkgs `lib` (lib.evalModules), for
# tests/test_nix_module.py. No NixOS is vendored, so the options the module sets are
# declared here, loosely; `pkgs` is a stub whose derivations are build scripts for the
# test to run:
# - pkgs.runCommand returns { outPath = "@store@/<name>"; script; }: the test runs the
#   script in bash with $out in a temporary store and the placeholders replaced;
# - pkgs.formats.{yaml,json}.generate returns a bash process substitution printing the
#   value as JSON (which is YAML too), so a script can `cp` it like a file.
{ lib, configuration }:

let
  valueType = with lib.types; nullOr (oneOf [
    bool int float str path (attrsOf valueType) (listOf valueType)
  ]) // { description = "JSON value"; };

  format = {
    type = valueType;
    generate = name: value: "<(printf %s ${lib.escapeShellArg (builtins.toJSON value)})";
  };

  pkgs = {
    formats = { yaml = _: format; json = _: format; };
    runCommand = name: _env: script: {
      type = "derivation"; outPath = "@store@/${name}"; inherit name script;
    };
    callPackage = _: _: { type = "derivation"; name = "zeta-agent"; outPath = "@package@"; };
  };

  loose = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };

  nixos = {
    options = {
      assertions = lib.mkOption {
        type = lib.types.listOf lib.types.anything;
        default = [ ];
      };
      environment.etc = loose;
      security.polkit.enable = lib.mkOption { type = lib.types.bool; default = false; };
      users = { users = loose; groups = loose; };
      systemd = {
        packages = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
        tmpfiles.packages = lib.mkOption {
          type = lib.types.listOf lib.types.anything;
          default = [ ];
        };
        targets = loose;
        services = loose;
      };
    };
  };

  evaluated = lib.evalModules {
    modules = [ nixos ../../nix/module.nix configuration ];
    specialArgs = { inherit pkgs; };
  };
  config = evaluated.config;
  cfg = config.services.zeta-agents;
  scriptOf = drv: { inherit (drv) name script; };
  options = [ ];
in
{
  failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
} // lib.optionalAttrs (cfg.enable && lib.all (a: a.assertion) config.assertions) {
  # In dependency order: the rendering reads the configuration directory.
  builds = map scriptOf [ cfg.generated.configDir cfg.generated.rendered ];
  etc = lib.mapAttrs (_: e: toString e.source) config.environment.etc;
  services = lib.mapAttrs (_: s: s.serviceConfig or { }) config.systemd.services;
  users = lib.attrNames config.users.users;
}
