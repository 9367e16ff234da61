"""Offline JSON schemas for the custom resources the manifests use (Strimzi, prometheus-operator, cert-manager, KEDA).

kubernetes-validate knows only built-in kinds. These schemas are written here after the upstream CRDs
(kafka.strimzi.io/v1beta2 from Strimzi 0.4x, monitoring.coreos.com/v1 from prometheus-operator 0.7x/0.8x,
keda.sh/v1alpha1 ScaledObject from KEDA 2.1x with its prometheus trigger's metadata keys):
they cover the fields distillery's manifests use, with the upstream types, enums and required keys, and reject
unknown keys where the manifests set them, so a typo fails here instead of in the operator. They are not the
complete upstream schemas.
"""

from __future__ import annotations

from typing import Any

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+([eEinumkKMGTP]*[-+]?[0-9]*)$"}]}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OPEN_OBJECT = {"type": "object"}


def strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def resource(spec: dict[str, Any]) -> dict[str, Any]:
    return strict(
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": strict(
                {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                    "namespace": {"type": "string"},
                    "labels": STRING_MAP,
                    "annotations": STRING_MAP,
                },
                required=["name"],
            ),
            "spec": spec,
        },
        required=["apiVersion", "kind", "metadata", "spec"],
    )


RESOURCES = strict(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "claims": {"type": "array"},
    }
)

VOLUME = strict(
    {
        "id": {"type": "integer", "minimum": 0},
        "type": {"enum": ["ephemeral", "persistent-claim"]},
        "size": {"type": "string"},
        "sizeLimit": {"type": "string", "pattern": r"^([0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"},
        "class": {"type": "string"},
        "deleteClaim": {"type": "boolean"},
        "kraftMetadata": {"enum": ["shared"]},
        "selector": STRING_MAP,
        "overrides": {"type": "array"},
    },
    required=["type"],
)

KAFKA = resource(
    strict(
        {
            "kafka": strict(
                {
                    "version": {"type": "string"},
                    "metadataVersion": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 1},
                    "listeners": {
                        "type": "array",
                        "minItems": 1,
                        "items": strict(
                            {
                                "name": {"type": "string", "pattern": r"^[a-z0-9]{1,11}$"},
                                "port": {"type": "integer", "minimum": 9092},
                                "type": {
                                    "enum": ["internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip"]
                                },
                                "tls": {"type": "boolean"},
                                "authentication": OPEN_OBJECT,
                                "configuration": OPEN_OBJECT,
                                "networkPolicyPeers": {"type": "array"},
                            },
                            required=["name", "port", "type", "tls"],
                        ),
                    },
                    "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "storage": OPEN_OBJECT,
                    "resources": RESOURCES,
                    "template": OPEN_OBJECT,
                    "metricsConfig": OPEN_OBJECT,
                    "rack": OPEN_OBJECT,
                    "authorization": OPEN_OBJECT,
                    "jvmOptions": OPEN_OBJECT,
                    "logging": OPEN_OBJECT,
                },
                required=["listeners"],
            ),
            "entityOperator": strict(
                {"topicOperator": OPEN_OBJECT, "userOperator": OPEN_OBJECT, "template": OPEN_OBJECT}
            ),
            "cruiseControl": OPEN_OBJECT,
            "kafkaExporter": OPEN_OBJECT,
            "clientsCa": OPEN_OBJECT,
            "clusterCa": OPEN_OBJECT,
            "maintenanceTimeWindows": {"type": "array", "items": {"type": "string"}},
        },
        required=["kafka"],
    )
)

KAFKA_NODE_POOL = resource(
    strict(
        {
            "replicas": {"type": "integer", "minimum": 0},
            "roles": {"type": "array", "minItems": 1, "items": {"enum": ["controller", "broker"]}},
            "storage": strict(
                {
                    "type": {"enum": ["ephemeral", "persistent-claim", "jbod"]},
                    "volumes": {"type": "array", "items": VOLUME},
                    **{k: v for k, v in VOLUME["properties"].items() if k not in ("type",)},
                },
                required=["type"],
            ),
            "resources": RESOURCES,
            "jvmOptions": OPEN_OBJECT,
            "template": OPEN_OBJECT,
        },
        required=["replicas", "roles", "storage"],
    )
)

KAFKA_TOPIC = resource(
    strict(
        {
            "topicName": {"type": "string"},
            "partitions": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
            "config": {"type": "object", "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
        }
    )
)

LABEL_SELECTOR = strict(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": strict(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                required=["key", "operator"],
            ),
        },
    }
)

SERVICE_MONITOR = resource(
    strict(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": strict({"any": {"type": "boolean"}, "matchNames": {"type": "array"}}),
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer"},
            "attachMetadata": OPEN_OBJECT,
            "endpoints": {
                "type": "array",
                "items": strict(
                    {
                        "port": {"type": "string"},
                        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "params": OPEN_OBJECT,
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"},
                        "tlsConfig": OPEN_OBJECT,
                        "authorization": OPEN_OBJECT,
                        "bearerTokenSecret": OPEN_OBJECT,
                        "followRedirects": {"type": "boolean"},
                        "enableHttp2": {"type": "boolean"},
                        "filterRunning": {"type": "boolean"},
                    }
                ),
            },
        },
        required=["selector"],
    )
)

PROMETHEUS_RULE = resource(
    strict(
        {
            "groups": {
                "type": "array",
                "items": strict(
                    {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "limit": {"type": "integer"},
                        "labels": STRING_MAP,
                        "query_offset": DURATION,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {
                            "type": "array",
                            "items": strict(
                                {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                                    "for": DURATION,
                                    "keep_firing_for": DURATION,
                                    "labels": STRING_MAP,
                                    "annotations": STRING_MAP,
                                },
                                required=["expr"],
                            ),
                        },
                    },
                    required=["name"],
                ),
            }
        }
    )
)

#: (apiVersion, kind) → schema.
# cert-manager.io/v1 (cert-manager 1.x): the Issuer kinds and Certificate fields the security component uses.
ISSUER_REF = strict({"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                     "group": {"type": "string"}}, ["name"])  # fmt: skip
ISSUER = resource(
    strict(
        {
            "selfSigned": strict({"crlDistributionPoints": {"type": "array", "items": {"type": "string"}}}),
            "ca": strict({"secretName": {"type": "string"}}, ["secretName"]),
        }
    )
)
CERTIFICATE = resource(
    strict(
        {
            "secretName": {"type": "string"},
            "commonName": {"type": "string", "maxLength": 64},
            "isCA": {"type": "boolean"},
            "duration": {"type": "string"},
            "renewBefore": {"type": "string"},
            "dnsNames": {"type": "array", "items": {"type": "string"}},
            "ipAddresses": {"type": "array", "items": {"type": "string"}},
            "usages": {
                "type": "array",
                "items": {
                    "enum": [
                        "digital signature",
                        "key encipherment",
                        "server auth",
                        "client auth",
                        "cert sign",
                        "crl sign",
                    ]
                },
            },
            "privateKey": strict(
                {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                }
            ),
            "issuerRef": ISSUER_REF,
        },
        ["secretName", "issuerRef"],
    )
)

# keda.sh/v1alpha1 ScaledObject (KEDA 2.1x). `behavior` is autoscaling/v2's HorizontalPodAutoscalerBehavior.
_SCALING_RULES = strict(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "tolerance": QUANTITY,
        "policies": {
            "type": "array",
            "items": strict(
                {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "exclusiveMinimum": 0},
                    "periodSeconds": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1800},
                },
                ["type", "value", "periodSeconds"],
            ),
        },
    }
)
_FLOAT_STRING = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
#: The prometheus scaler's metadata keys (KEDA's CRD types metadata as a string map; the scaler rejects the rest).
PROMETHEUS_TRIGGER_METADATA = strict(
    {
        "serverAddress": {"type": "string", "pattern": "^https?://"},
        "query": {"type": "string", "minLength": 1},
        "threshold": _FLOAT_STRING,
        "activationThreshold": _FLOAT_STRING,
        "namespace": {"type": "string"},
        "customHeaders": {"type": "string"},
        "ignoreNullValues": {"enum": ["true", "false"]},
        "queryParameters": {"type": "string"},
        "unsafeSsl": {"enum": ["true", "false"]},
        "authModes": {"type": "string"},
        "timeout": {"type": "string"},
    },
    ["serverAddress", "query", "threshold"],
)
SCALED_OBJECT = resource(
    strict(
        {
            "scaleTargetRef": strict(
                {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string", "minLength": 1},
                    "envSourceContainerName": {"type": "string"},
                },
                ["name"],
            ),
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": strict(
                {
                    "failureThreshold": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "behavior": {
                        "enum": ["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]
                    },
                },
                ["failureThreshold", "replicas"],
            ),
            "advanced": strict(
                {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": strict(
                        {
                            "name": {"type": "string"},
                            "behavior": strict({"scaleUp": _SCALING_RULES, "scaleDown": _SCALING_RULES}),
                        }
                    ),
                    "scalingModifiers": OPEN_OBJECT,
                }
            ),
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "allOf": [
                        strict(
                            {
                                "type": {"type": "string", "minLength": 1},
                                "name": {"type": "string"},
                                "metadata": STRING_MAP,
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                                "authenticationRef": strict(
                                    {"name": {"type": "string"}, "kind": {"type": "string"}}, ["name"]
                                ),
                            },
                            ["type", "metadata"],
                        ),
                        {
                            "if": {"properties": {"type": {"const": "prometheus"}}},
                            "then": {"properties": {"metadata": PROMETHEUS_TRIGGER_METADATA}},
                        },
                    ]
                },
            },
        },
        ["scaleTargetRef", "triggers"],
    )
)

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("kafka.strimzi.io/v1beta2", "Kafka"): KAFKA,
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): KAFKA_NODE_POOL,
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): KAFKA_TOPIC,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
