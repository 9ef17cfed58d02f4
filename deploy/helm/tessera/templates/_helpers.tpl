{{/* Object names: "tessera-<component>" for release "tessera", else "<release>-tessera-<component>". */}}
{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
app.kubernetes.io/part-of: tessera
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "replica") */}}
{{- define "tessera.selector" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tessera.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tessera.pullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tessera.hostNetwork" -}}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end -}}

{{/* env entries pointing in-cluster config at .Values.apiServer */}}
{{- define "tessera.apiServerEnv" -}}
{{- if and .Values.apiServer.host .Values.apiServer.port }}
env:
  - name: KUBERNETES_SERVICE_HOST
    value: {{ .Values.apiServer.host | quote }}
  - name: KUBERNETES_SERVICE_PORT
    value: {{ .Values.apiServer.port | quote }}
{{- end }}
{{- end -}}

{{- define "tessera.restricted" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{- define "tessera.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/* The Secret with the certificate of one identity (controller, node, replica): fixed
names, the ones `tessera certs --secrets-yaml` prints. */}}
{{- define "tessera.tlsSecretName" -}}
tessera-tls-{{ . }}
{{- end -}}

{{/* Args of a daemon that talks to replica ports: --insecure-plaintext when TLS is off. */}}
{{- define "tessera.tlsArgs" -}}
{{- if not .Values.tls.enabled }}
- --insecure-plaintext
{{- end }}
{{- end -}}

{{/* The certificate directory's mount (where --tls-dir looks by default). */}}
{{- define "tessera.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tessera/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The certificate directory's volume: (dict "ctx" $ "identity" "replica") */}}
{{- define "tessera.tlsVolume" -}}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "tessera.tlsSecretName" .identity }}
    defaultMode: 256  # = 0400
{{- end }}
{{- end -}}

{{/* The SnapshotMetadata API's Service (its serving certificate names it), and the Secret
with that certificate: a fixed name, the one `tessera certs --secrets-yaml` prints. */}}
{{- define "tessera.snapshotMetadataService" -}}
{{ include "tessera.fullname" . }}-snapshot-metadata
{{- end -}}

{{- define "tessera.snapshotMetadataSecretName" -}}
tessera-snapshot-metadata-tls
{{- end -}}
