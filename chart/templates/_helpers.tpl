{{/*
Shared helpers of the p2p chart. Object names are fixed (p2p-agent, p2p-proxy, p2p-tracker and the
ConfigMaps agent, proxy, tracker) because the product documents them; hence one release per
cluster.
*/}}

{{/* The namespace every object goes to: the release namespace unless overridden. */}}
{{- define "p2p.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{/* Labels on every object. Call with (dict "root" $ "component" "agent"). */}}
{{- define "p2p.labels" -}}
{{ include "p2p.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: p2p
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The labels a selector matches; they never change between chart versions. */}}
{{- define "p2p.selectorLabels" -}}
app.kubernetes.io/name: p2p
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Image reference of a component: repository@digest when a digest is given, else
repository:tag (the tag defaulting to the chart's appVersion).
Call with (dict "root" $ "image" .Values.agent.image).
*/}}
{{- define "p2p.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Labels of a component's pods: the chart's labels plus the component's podLabels (the chart's
win; the schema refuses them in podLabels anyway). Call with
(dict "root" $ "component" "agent" "extra" .Values.agent.podLabels).
*/}}
{{- define "p2p.podLabels" -}}
{{- $labels := include "p2p.labels" . | fromYaml -}}
{{- toYaml (merge $labels (deepCopy (.extra | default dict))) -}}
{{- end -}}

{{/*
Affinity of a component's pods: the component's `affinity` value with the chart's own pod
anti-affinity term (one pod of the component per node) added to the user's terms, as a required
term (proxies: host ports) or a preferred one (trackers). Call with
(dict "root" $ "component" "proxy" "affinity" .Values.proxy.affinity "required" true).
*/}}
{{- define "p2p.affinity" -}}
{{- $affinity := deepCopy (.affinity | default dict) -}}
{{- $anti := get $affinity "podAntiAffinity" | default dict -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "p2p.selectorLabels" . | fromYaml)) -}}
{{- if .required -}}
{{- $key := "requiredDuringSchedulingIgnoredDuringExecution" -}}
{{- $_ := set $anti $key (append (get $anti $key | default list) $term) -}}
{{- else -}}
{{- $key := "preferredDuringSchedulingIgnoredDuringExecution" -}}
{{- $_ := set $anti $key (append (get $anti $key | default list) (dict "weight" 100 "podAffinityTerm" $term)) -}}
{{- end -}}
{{- $_ := set $affinity "podAntiAffinity" $anti -}}
{{- toYaml $affinity -}}
{{- end -}}

{{/*
The configured registries (string or list) as a JSON list, without blanks and without two entries
for the same host[:port]. Fails with the key named when none is left (schema validation refuses
that earlier, but it can be skipped).
*/}}
{{- define "p2p.registries" -}}
{{- $given := .Values.registry -}}
{{- if kindIs "string" $given -}}
{{- $given = list $given -}}
{{- end -}}
{{- $list := list -}}
{{- $seen := dict -}}
{{- range $given -}}
{{- $value := trim (toString .) -}}
{{- $name := include "p2p.registryName" $value -}}
{{- if and $name (not (hasKey $seen $name)) -}}
{{- $_ := set $seen $name true -}}
{{- $list = append $list $value -}}
{{- end -}}
{{- end -}}
{{- if not $list -}}
{{- fail "registry: set the registry domain to accelerate, e.g. --set registry=registry.example.com" -}}
{{- end -}}
{{- toJson $list -}}
{{- end -}}

{{/* A registry's name as containerd spells it in hosts directories and ?ns=: host[:port]. */}}
{{- define "p2p.registryName" -}}
{{- regexReplaceAll "^[hH][tT][tT][pP][sS]?://" (trimSuffix "/" .) "" | lower -}}
{{- end -}}

{{/*
Mirror entries: a JSON list of {name, server}, one per registry, and with mirror.allRegistries
the catch-all {name: "_default", server: ""} (containerd's fallback host namespace; no server:
containerd then falls back to each image's own registry).
*/}}
{{- define "p2p.mirrorHosts" -}}
{{- $hosts := list -}}
{{- range (include "p2p.registries" . | fromJsonArray) -}}
{{- $name := include "p2p.registryName" . -}}
{{- $scheme := ternary "http" "https" (regexMatch "^[hH][tT][tT][pP]://" .) -}}
{{- $hosts = append $hosts (dict "name" $name "server" (printf "%s://%s" $scheme $name)) -}}
{{- end -}}
{{- if .Values.mirror.allRegistries -}}
{{- $hosts = append $hosts (dict "name" "_default" "server" "") -}}
{{- end -}}
{{- toJson $hosts -}}
{{- end -}}

{{/* containerd's config file on the nodes: mirror.containerdConfig, else config.toml beside configPath. */}}
{{- define "p2p.containerdConfig" -}}
{{- default (printf "%s/config.toml" (dir .Values.mirror.configPath)) .Values.mirror.containerdConfig -}}
{{- end -}}

{{/* Full DNS names of the headless Services. */}}
{{- define "p2p.proxyHeadlessHost" -}}
{{- printf "p2p-proxy-headless.%s.svc.%s" (include "p2p.namespace" .) .Values.clusterDomain -}}
{{- end -}}
{{- define "p2p.trackerHeadlessHost" -}}
{{- printf "p2p-tracker-headless.%s.svc.%s" (include "p2p.namespace" .) .Values.clusterDomain -}}
{{- end -}}

{{/*
The service configurations as YAML mappings. The keys the chart computes come first; the
component's `config` values add further settings (the schema refuses the computed keys there).
*/}}
{{- define "p2p.agentConfig" -}}
{{- $a := .Values.agent -}}
{{- $config := dict
  "listen" (include "p2p.agentRegistryAddress" .)
  "metricsListen" (printf ":%d" (int $a.ports.metrics))
  "peerPort" (int $a.ports.peer)
  "dataDir" $a.dataDir
  "registry" (include "p2p.registries" . | fromJsonArray)
  "proxies" (list (printf "%s://%s:%d" (include "p2p.proxyScheme" .) (include "p2p.proxyHeadlessHost" .) (int .Values.proxy.ports.http)))
  "downloadRate" .Values.downloadRate
  "uploadRate" .Values.uploadRate
  "cacheSize" $a.cacheSize
  "diskWriteLatencyLimit" $a.diskWriteLatencyLimit
  "diskMinDownloadRate" $a.diskMinDownloadRate
  "cacheHighWatermark" (int $a.cacheHighWatermark)
  "cacheLowWatermark" (int $a.cacheLowWatermark)
  "cacheMaxUnused" $a.cacheMaxUnused
  "logLevel" .Values.logLevel
  "logFormat" .Values.logFormat
-}}
{{- if .Values.proxy.tls.secretName -}}
{{- $_ := set $config "proxyCaFile" "/etc/p2p/proxy-ca/ca.crt" -}}
{{- end -}}
{{- if .Values.mirror.enabled -}}
{{- /* Copies of containerd's hosts.toml files, kept by the mirror-config container. */ -}}
{{- $_ := set $config "mirrorConfigPath" "/run/p2p/mirror-state" -}}
{{- end -}}
{{- toYaml (merge $config (deepCopy $a.config)) -}}
{{- end -}}

{{/*
The agent's registry API: agent.loopback and the registry port, an IPv6 address in brackets.
Service listen addresses elsewhere are ":port": every address of the node, IPv4 and IPv6.
*/}}
{{- define "p2p.agentRegistryAddress" -}}
{{- $host := .Values.agent.loopback | default "127.0.0.1" -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int .Values.agent.ports.registry) -}}
{{- else -}}
{{- printf "%s:%d" $host (int .Values.agent.ports.registry) -}}
{{- end -}}
{{- end -}}

{{/* ipFamilyPolicy and ipFamilies of a Service spec, when the values set them. */}}
{{- define "p2p.serviceIpFamilies" -}}
{{- with .Values.ipFamilyPolicy }}
ipFamilyPolicy: {{ . }}
{{- end }}
{{- with .Values.ipFamilies }}
ipFamilies:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* https when the proxies serve their agent API with a certificate (proxy.tls.secretName). */}}
{{- define "p2p.proxyScheme" -}}
{{- if .Values.proxy.tls.secretName -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{- define "p2p.proxyConfig" -}}
{{- $p := .Values.proxy -}}
{{- $config := dict
  "listen" (printf ":%d" (int $p.ports.http))
  "peerPort" (int $p.ports.peer)
  "dataDir" $p.dataDir
  "registry" (include "p2p.registries" . | fromJsonArray)
  "trackers" (include "p2p.trackerURLs" . | fromJsonArray)
  "cacheSize" $p.cacheSize
  "uploadRate" $p.uploadRate
  "logLevel" .Values.logLevel
  "logFormat" .Values.logFormat
-}}
{{- if $p.tls.secretName -}}
{{- $_ := set $config "tlsCertFile" "/etc/p2p/tls/tls.crt" -}}
{{- $_ := set $config "tlsKeyFile" "/etc/p2p/tls/tls.key" -}}
{{- end -}}
{{- $egress := include "p2p.egressProxy" . | fromYaml -}}
{{- if $egress.url -}}
{{- $_ := set $config "originProxy" $egress.url -}}
{{- end -}}
{{- if $egress.noProxy -}}
{{- $_ := set $config "originNoProxy" $egress.noProxy -}}
{{- end -}}
{{- if $egress.fromEnvironment -}}
{{- $_ := set $config "originProxyFromEnv" true -}}
{{- end -}}
{{- toYaml (merge $config (deepCopy $p.config)) -}}
{{- end -}}

{{/*
proxy.egressProxy, checked: url and secretName exclude each other and fromEnvironment; a URL with
credentials belongs in the Secret, not in the ConfigMap.
*/}}
{{- define "p2p.egressProxy" -}}
{{- $e := .Values.proxy.egressProxy -}}
{{- if and $e.url $e.secretName -}}
{{- fail "proxy.egressProxy: give url or secretName, not both" -}}
{{- end -}}
{{- if and $e.fromEnvironment (or $e.url $e.secretName) -}}
{{- fail "proxy.egressProxy.fromEnvironment: takes the proxy from the environment; leave url and secretName empty" -}}
{{- end -}}
{{- if contains "@" (toString $e.url) -}}
{{- fail "proxy.egressProxy.url: credentials do not belong in a ConfigMap; put the whole URL in a Secret (proxy.egressProxy.secretName)" -}}
{{- end -}}
{{- toYaml $e -}}
{{- end -}}

{{/* The trackers written into every metainfo: udp:// first when tracker.udp, then http://. */}}
{{- define "p2p.trackerURLs" -}}
{{- $host := include "p2p.trackerHeadlessHost" . -}}
{{- $port := int .Values.tracker.ports.http -}}
{{- $urls := list (printf "http://%s:%d/announce" $host $port) -}}
{{- if .Values.tracker.udp -}}
{{- $urls = prepend $urls (printf "udp://%s:%d" $host $port) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{- define "p2p.trackerConfig" -}}
{{- $t := .Values.tracker -}}
{{- $config := dict
  "listen" (printf ":%d" (int $t.ports.http))
  "logLevel" .Values.logLevel
  "logFormat" .Values.logFormat
-}}
{{- if $t.udp -}}
{{- $_ := set $config "udpListen" (printf ":%d" (int $t.ports.http)) -}}
{{- end -}}
{{- toYaml (merge $config (deepCopy $t.config)) -}}
{{- end -}}

{{/* Pod-level security context of every p2p pod. */}}
{{- define "p2p.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context of the p2p services: non-root, read-only, no capabilities. */}}
{{- define "p2p.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end -}}

{{/*
Init container that hands a hostPath data directory to the service user (mode 0700: cached layers
may come from private repositories). Call with (dict "root" $ "image" ... "pullPolicy" ... "dir" ...).
*/}}
{{- define "p2p.dataDirInit" -}}
- name: data-dir-owner
  image: {{ .image | quote }}
  imagePullPolicy: {{ .pullPolicy }}
  command:
    - /bin/sh
    - -c
    - |
      set -eu
      owner="$P2P_UID:$P2P_GID"
      if [ "$(stat -c %u:%g "$P2P_DATA_DIR")" != "$owner" ]; then
        chown -R "$owner" "$P2P_DATA_DIR"
        echo "data-dir-owner: $P2P_DATA_DIR now belongs to $owner"
      fi
      chmod 0700 "$P2P_DATA_DIR"
  env:
    - name: P2P_DATA_DIR
      value: {{ .dir | quote }}
    - name: P2P_UID
      value: {{ int .root.Values.securityContext.runAsUser | quote }}
    - name: P2P_GID
      value: {{ int .root.Values.securityContext.runAsGroup | quote }}
  securityContext:
    runAsNonRoot: false
    runAsUser: 0
    runAsGroup: 0
    allowPrivilegeEscalation: false
    privileged: false
    readOnlyRootFilesystem: true
    capabilities:
      drop:
        - ALL
      add:
        - CHOWN
        - FOWNER
        - DAC_READ_SEARCH
  resources:
    requests:
      cpu: 10m
      memory: 16M
    limits:
      cpu: 500m
      memory: 64M
  volumeMounts:
    - name: data
      mountPath: {{ .dir | quote }}
{{- end -}}

{{/* The prometheus.io annotations of a pod. Call with (dict "root" $ "port" N). */}}
{{- define "p2p.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ int .port | quote }}
prometheus.io/path: /metrics
{{- with .scheme }}
prometheus.io/scheme: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* First line of every hosts.toml this release writes; the mirror script only touches those. */}}
{{- define "p2p.mirrorMarker" -}}
# managed-by: p2p release {{ include "p2p.namespace" . }}/{{ .Release.Name }}
{{- end -}}

{{/* Environment of the mirror containers: where the files come from and go to. */}}
{{- define "p2p.mirrorEnv" -}}
- name: P2P_MIRROR_SOURCE
  value: /etc/p2p/mirror
- name: P2P_MIRROR_TARGET
  value: /host/containerd-certs.d
- name: P2P_MIRROR_INTERVAL
  value: {{ int .Values.mirror.resyncSeconds | quote }}
- name: P2P_MIRROR_STATE
  value: /run/p2p/mirror-state
- name: P2P_MIRROR_MERGE
  value: {{ ternary "1" "0" .Values.mirror.mergeExisting | quote }}
- name: P2P_MIRROR_HOST_PATH
  value: {{ .Values.mirror.configPath | quote }}
- name: P2P_CONTAINERD_CONFIG
  value: {{ printf "/host/containerd-config/%s" (base (include "p2p.containerdConfig" .)) | quote }}
- name: P2P_CONTAINERD_CONFIG_HOST
  value: {{ include "p2p.containerdConfig" . | quote }}
{{- end -}}

{{- define "p2p.mirrorMounts" -}}
- name: mirror
  mountPath: /etc/p2p/mirror
  readOnly: true
- name: containerd-certs
  mountPath: /host/containerd-certs.d
- name: mirror-state
  mountPath: /run/p2p/mirror-state
- name: containerd-config
  mountPath: /host/containerd-config
  readOnly: true
{{- end -}}

{{/*
The mirror containers run as root, because containerd's config directory belongs to root, but
with no capability at all: root may write the root-owned directory as its owner.
*/}}
{{- define "p2p.mirrorSecurityContext" -}}
runAsNonRoot: false
runAsUser: 0
runAsGroup: 0
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end -}}

{{/* hosts.toml for one registry. Call with (dict "root" $ "host" {name, server}). */}}
{{- define "p2p.hostsToml" -}}
{{ include "p2p.mirrorMarker" .root }}
{{- if .host.server }}
# containerd asks the p2p agent on this node first for images of {{ .host.name }} and falls back
# to the registry itself when the agent does not answer. The agent pod removes this file when it
# stops; see docs/install.md.
server = {{ .host.server | quote }}
{{- else }}
# Catch-all (mirror.allRegistries): containerd asks the p2p agent on this node first for images
# of every registry without a hosts.toml of its own; the agent answers 404 at once for those it
# does not accelerate, and containerd then pulls from the image's own registry.
{{- end }}

[host."http://{{ include "p2p.agentRegistryAddress" .root }}"]
  capabilities = ["pull", "resolve"]
{{- end -}}

{{/*
mirror.sh: installs and removes this release's hosts.toml files under containerd's config_path.
  sync    write each configured registry's hosts.toml; remove ours for registries no longer listed
  remove  remove every hosts.toml this release wrote, putting merged originals back
  watch   sync now and every $P2P_MIRROR_INTERVAL seconds; on SIGTERM or SIGINT remove and exit 0
Only files whose first line is this release's marker are replaced or removed. A hosts.toml that
someone else wrote is, with $P2P_MIRROR_MERGE=1 (mirror.mergeExisting), merged: its original is
kept beside it as hosts.toml.p2p-orig, the file becomes the original with the agent as its first
host (p2p_agent.mirror_files, run with $P2P_MIRROR_PYTHON, checks the result with a TOML parser),
and the original is put back on removal. A merged file replaced by its owner is merged again from
the new file; an edited hosts.toml.p2p-orig is merged again too. Without merging (or when the
file cannot be merged safely) the file is left alone with a warning, and that registry is not
mirrored there.
With $P2P_MIRROR_STATE set, every sync also copies the hosts.toml containerd will read for each
configured registry (ours, merged, someone else's, or none) into $P2P_MIRROR_STATE/<registry>/
hosts.toml (at most 64 KiB each), and writes the verdict on containerd's own config file
($P2P_CONTAINERD_CONFIG: does containerd read hosts.toml files from $P2P_MIRROR_HOST_PATH at all?)
to $P2P_MIRROR_STATE/containerd.json: the agent shows both in its status (mirrorConfigPath)
without seeing containerd's directories, where registry client keys may live. Conditions (the
verdict, files left alone) are logged when they change; changes to files are always logged.
*/}}
{{- define "p2p.mirrorScript" -}}
#!/bin/sh
# Rendered by the p2p Helm chart: keeps containerd's hosts.toml files for the p2p mirror.
set -eu
src=${P2P_MIRROR_SOURCE:-/etc/p2p/mirror}
dst=${P2P_MIRROR_TARGET:-/host/containerd-certs.d}
state=${P2P_MIRROR_STATE:-}
interval=${P2P_MIRROR_INTERVAL:-60}
merge=${P2P_MIRROR_MERGE:-1}
py=${P2P_MIRROR_PYTHON:-python3}
host_path=${P2P_MIRROR_HOST_PATH:-$dst}
ctd_config=${P2P_CONTAINERD_CONFIG:-}
ctd_config_host=${P2P_CONTAINERD_CONFIG_HOST:-$ctd_config}
marker='{{ include "p2p.mirrorMarker" . }}'
orig_suffix=.p2p-orig
notes=""
last_notes=""

say() { echo "p2p-mirror: $*"; }

# A condition worth one log line while it lasts (logged when the set of them changes).
note() {
  notes="$notes$*
"
}

have_tools=no
if "$py" -c 'import p2p_agent.mirror_files' >/dev/null 2>&1; then
  have_tools=yes
fi

ours() {
  [ -f "$1" ] || return 1
  first=""
  IFS= read -r first < "$1" || true
  [ "$first" = "$marker" ]
}

put() {
  mkdir -p "${2%/*}"
  cp "$1" "$2.p2p-new"
  mv -f "$2.p2p-new" "$2"
}

restore_one() {
  mv -f "$1$orig_suffix" "$1"
  say "restored $1 (the original p2p had merged the agent into)"
}

remove_one() {
  if [ -f "$1$orig_suffix" ]; then
    restore_one "$1"
    return 0
  fi
  rm -f "$1"
  rmdir "${1%/hosts.toml}" 2>/dev/null || true
  say "removed $1"
}

# merge_into OURS NAME ORIGINAL TARGET: TARGET becomes ORIGINAL with the agent asked first.
merge_into() {
  target=$4
  if [ "$have_tools" != yes ]; then
    note "warning: $target was not written by p2p and this image cannot merge it ($py -m p2p_agent.mirror_files is missing); leaving it, $2 is not mirrored on this node"
    return 0
  fi
  rc=0
  why=$("$py" -m p2p_agent.mirror_files merge "$1" "$3" 2>&1 > "$target.p2p-new") || rc=$?
  if [ "$rc" -ne 0 ]; then
    rm -f "$target.p2p-new"
    if [ "$rc" -eq 3 ]; then
      # The original already sends pulls to the agent: it is the right file as it is.
      [ "$3" = "$target" ] || restore_one "$target"
      note "$target was not written by p2p but already names the p2p agent; leaving it as it is"
    else
      note "warning: cannot merge the p2p agent into $target ($why); leaving it, $2 is not mirrored on this node"
    fi
    return 0
  fi
  if [ "$3" = "$target" ]; then
    # Someone else's file: keep it (mode and times too) before replacing it.
    cp -p "$target" "$target$orig_suffix.p2p-new" 2>/dev/null || cp "$target" "$target$orig_suffix.p2p-new"
    mv -f "$target$orig_suffix.p2p-new" "$target$orig_suffix"
  fi
  if [ -f "$target" ] && [ "$(cat "$target.p2p-new")" = "$(cat "$target")" ]; then
    rm -f "$target.p2p-new"
    return 0
  fi
  chmod --reference="$3" "$target.p2p-new" 2>/dev/null || true
  mv -f "$target.p2p-new" "$target"
  say "merged the p2p agent into $target (the original is kept in $target$orig_suffix)"
}

sync_one() {
  file=$1
  name=$2
  target="$dst/$name/hosts.toml"
  if [ -e "$target" ] && ! ours "$target"; then
    # Someone else's file: new, or the owner replaced our merged one (then the backup is stale).
    if [ "$merge" = 1 ]; then
      merge_into "$file" "$name" "$target" "$target"
      return 0
    fi
    rm -f "$target$orig_suffix"
    note "warning: $target was not written by p2p; leaving it, $name is not mirrored on this node (mirror.mergeExisting is off)"
    return 0
  fi
  if [ -f "$target$orig_suffix" ]; then
    if [ ! -e "$target" ]; then
      # The merged file was deleted: its owner dropped the registry's configuration.
      rm -f "$target$orig_suffix"
      say "$target was deleted; dropped $target$orig_suffix, writing p2p's own file"
    elif [ "$merge" = 1 ]; then
      merge_into "$file" "$name" "$target$orig_suffix" "$target"
      return 0
    else
      restore_one "$target"
      note "warning: $target was not written by p2p; leaving it, $name is not mirrored on this node (mirror.mergeExisting is off)"
      return 0
    fi
  fi
  if [ -f "$target" ] && [ "$(cat "$file")" = "$(cat "$target")" ]; then
    return 0
  fi
  put "$file" "$target"
  say "wrote $target"
}

report() {
  [ -n "$state" ] || return 0
  target="$dst/$1/hosts.toml"
  copy="$state/$1/hosts.toml"
  if [ ! -f "$target" ]; then
    rm -f "$copy"
    return 0
  fi
  if [ -f "$copy" ] && [ "$(head -c 65537 "$target")" = "$(cat "$copy")" ]; then
    return 0
  fi
  mkdir -p "$state/$1"
  head -c 65537 "$target" > "$copy.p2p-new"
  mv -f "$copy.p2p-new" "$copy"
}

check_containerd() {
  [ -n "$ctd_config" ] || return 0
  if [ "$have_tools" != yes ]; then
    note "cannot check containerd's config: this image has no $py -m p2p_agent.mirror_files"
    return 0
  fi
  set -- containerd --config "$ctd_config" --host-config "$ctd_config_host" \
    --config-path "$host_path"
  [ -z "$state" ] || set -- "$@" --out "$state/containerd.json"
  verdict=$("$py" -m p2p_agent.mirror_files "$@" 2>&1) || true
  note "$verdict"
}

sync_all() {
  notes=""
  check_containerd
  for file in "$src"/*/hosts.toml; do
    [ -f "$file" ] || continue
    name=${file%/hosts.toml}
    name=${name##*/}
    sync_one "$file" "$name"
    report "$name" || say "warning: cannot copy $name/hosts.toml to $state"
  done
  for target in "$dst"/*/hosts.toml; do
    ours "$target" || continue
    name=${target%/hosts.toml}
    name=${name##*/}
    [ -f "$src/$name/hosts.toml" ] || remove_one "$target"
  done
  if [ -n "$state" ]; then
    for copy in "$state"/*/hosts.toml; do
      [ -f "$copy" ] || continue
      name=${copy%/hosts.toml}
      name=${name##*/}
      [ -f "$src/$name/hosts.toml" ] || rm -f "$copy"
    done
  fi
  if [ "$notes" != "$last_notes" ]; then
    printf '%s' "$notes" | while IFS= read -r line; do say "$line"; done
    last_notes=$notes
  fi
}

remove_all() {
  for target in "$dst"/*/hosts.toml; do
    if ours "$target"; then
      remove_one "$target"
    fi
  done
}

watch() {
  sleeper=""
  trap 'if [ -n "$sleeper" ]; then kill "$sleeper" 2>/dev/null || true; fi; remove_all; exit 0' TERM INT
  while :; do
    sync_all || say "warning: sync failed; retrying in $interval s"
    sleep "$interval" &
    sleeper=$!
    wait "$sleeper" || true
    sleeper=""
  done
}

case "${1:-}" in
  sync) sync_all ;;
  remove) remove_all ;;
  watch) watch ;;
  *) echo "usage: mirror.sh sync|remove|watch" >&2; exit 2 ;;
esac
{{- end -}}


{{/*
A node selector as kubectl label arguments: "a=b c=d", without the labels the kubelet sets
itself (kubernetes.io/os, kubernetes.io/arch), which nobody labels by hand.
*/}}
{{- define "p2p.labelList" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- if not (has $k (list "kubernetes.io/os" "kubernetes.io/arch")) -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- end -}}
{{- join " " $pairs -}}
{{- end -}}
