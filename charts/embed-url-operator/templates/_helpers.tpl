{{/*
Chart name, overridable with nameOverride. Truncated to 63 characters (the
DNS label limit) because it is used in names and label values.
*/}}
{{- define "embed-url-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of the release's resources, at most 63 characters.
A release whose name already contains the chart name is not repeated
("embed-url-operator" rather than "embed-url-operator-embed-url-operator").
*/}}
{{- define "embed-url-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Full name plus a suffix, still at most 63 characters: the full name is cut
short enough for the suffix to fit.
Usage: include "embed-url-operator.suffixedName" (list . "-leader-election")
*/}}
{{- define "embed-url-operator.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "embed-url-operator.fullname" $root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base $suffix }}
{{- end }}

{{/*
Value of the helm.sh/chart label: chart name and version.
*/}}
{{- define "embed-url-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the stable subset used by the Deployment selector, the
Service, the PodDisruptionBudget and the NetworkPolicy. Never change these
in an upgrade (a Deployment's selector is immutable).
*/}}
{{- define "embed-url-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embed-url-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels on every resource.
*/}}
{{- define "embed-url-operator.labels" -}}
{{ include "embed-url-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: embed-url-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "embed-url-operator.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "embed-url-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embed-url-operator.fullname" .) .Values.serviceAccount.name }}
{{- else if .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else if not .Values.rbac.create }}
{{- "default" }}
{{- else }}
{{- fail "serviceAccount.create is false: set serviceAccount.name to the existing ServiceAccount the operator runs as (the chart binds its RBAC, which reads Secrets, to it; it will not bind that to the namespace's `default` ServiceAccount, which every other pod there uses)" }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository@digest when a digest is set,
repository:tag otherwise (tag defaults to the chart's appVersion).
*/}}
{{- define "embed-url-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Whether leader election is on: "true" or "" (false).
leaderElection.enabled is "auto" (on when replicas > 1), true or false.
*/}}
{{- define "embed-url-operator.leaderElection" -}}
{{- $enabled := .Values.leaderElection.enabled }}
{{- if kindIs "bool" $enabled }}
{{- if $enabled }}true{{ end }}
{{- else if eq (toString $enabled) "auto" }}
{{- if gt (int .Values.replicas) 1 }}true{{ end }}
{{- else }}
{{- fail (printf "leaderElection.enabled must be \"auto\", true or false, not %v" $enabled) }}
{{- end }}
{{- end }}

{{/*
Name of the leader-election Lease.
*/}}
{{- define "embed-url-operator.leaseName" -}}
{{- default (include "embed-url-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Rules the operator needs in every namespace it watches. Shared by the
ClusterRole (all namespaces) and the per-namespace Roles (watchNamespaces).
Exactly what the code calls, no wildcards: requests are only read (their
status is written through the status subresource, by server-side apply or a
merge patch); Secrets can be created and patched (server-side apply) but
never updated or deleted (owner references let the garbage collector delete
them with their EmbedUrlRequest); events are only created (the operator uses
a new kube Recorder per event, which never patches one).
*/}}
{{- define "embed-url-operator.operatorRules" -}}
- apiGroups: ["embedurl.io"]
  resources: ["embedurlrequests"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["embedurl.io"]
  resources: ["embedurlrequests/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
An IntOrString value (PodDisruptionBudget minAvailable/maxUnavailable):
integers unquoted, percentages such as "50%" quoted.
*/}}
{{- define "embed-url-operator.intOrString" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ int . }}{{ end }}
{{- end }}
