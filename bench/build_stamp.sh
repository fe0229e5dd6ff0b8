# Sourced by the device scripts before they build the extension in place. The device machine keeps
# ignored build outputs between calls on a warm machine, while the sources arrive with their old
# modification times: ninja then finds nothing to do and the call runs the previous call's kernels
# (session 8: a suite ran on the build an A/B call had left, patch included). So the sources are
# touched whenever their content differs from what the last successful build compiled.
#   lords_sources_check      before a build: touch csrc/ and setup.py if they changed since the stamp
#   lords_sources_stamp      after a successful build: remember their content
_lords_sources_sum() { cat setup.py csrc/* 2>/dev/null | sha1sum | cut -d' ' -f1; }
lords_sources_check() {
  if [ "$(cat build/.lords_sources 2>/dev/null)" != "$(_lords_sources_sum)" ]; then
    touch setup.py csrc/*
  fi
}
lords_sources_stamp() { mkdir -p build && _lords_sources_sum > build/.lords_sources; }
