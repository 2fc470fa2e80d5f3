"""The AWS side of a Keycell deployment: one `CellStack` per region and one `GlobalStack`.

Everything is read from the cell set (`keycell.deployment`, `infra/cells.toml`); the
stacks add no sizing of their own. A cell is:

- the regional API: the Chalice app in `functions/api`, packaged by Chalice's own CDK
  construct (`chalice.cdk.Chalice`) into a Lambda function behind a regional REST API,
  throttled per the cell's `api_rate_limit` / `api_burst`, with access logs and X-Ray;
- the rotation and revocation functions: Lambda functions from the same deployment
  package (their handlers are the cell's `rotation_handler` / `revocation_handler`),
  rotation driven by one EventBridge schedule per `rotation_schedules` entry and by
  Secrets Manager, revocation by an SQS queue fed from the cell's event bus;
- the ledger: one DynamoDB table (hash key `kind`, range key `path`, TTL on
  `expires_at`, as `keycell.adapters.ledgers.dynamodb` expects) with point-in-time
  recovery, deletion protection and a customer-managed KMS key;
- key custody: AWS KMS (the `aws-kms` key backend creates its keys under
  `alias/keycell/`; the stack's own keys encrypt the table, logs and queues);
- the relay: a long-lived ECS Fargate service behind a network load balancer, so the
  relays of other cells reach it at `relay.<cell>.<dns_zone>`;
- one IAM role per function and per task, each allowed only its own table, keys, bus
  and queue.

The global stack (home region) holds the role EventBridge uses to forward a
revocation from the cell where it was made to every other cell's bus, and publishes
the cell directory as an SSM parameter; each cell stack forwards only revocations
whose `origin_cell` is itself, so forwarding never loops.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_route53 as route53
from aws_cdk import aws_route53_targets as route53_targets
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_ssm as ssm
from chalice.cdk import Chalice
from constructs import Construct

from keycell.control_plane.ledger import ATTR_EXPIRES_AT, ATTR_KIND, ATTR_PATH
from keycell.deployment import RELAY_TLS_FIELDS, Cell, CellSet, relay_peers

REPO = Path(__file__).resolve().parents[2]
API_SOURCE = REPO / "functions" / "api"
LAMBDA_RUNTIME = lambda_.Runtime.PYTHON_3_11
API_STAGE = "v1"
# Chalice needs an IAM role ARN when it does not manage the role; the stack replaces
# it with the role it builds (see `_api`), so this value never reaches a template.
_ROLE_REPLACED_BELOW = "arn:aws:iam::000000000000:role/replaced-by-the-cell-stack"
# What the `aws-kms` key backend does to the keys it creates and uses
# (adapters/keys/aws_kms.py): use for data, and manage their versions and aliases.
KMS_USE = ["kms:Encrypt", "kms:Decrypt", "kms:Sign", "kms:Verify", "kms:GetPublicKey", "kms:DescribeKey"]
KMS_MANAGE = [
    "kms:DisableKey",
    "kms:EnableKey",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ListResourceTags",
]
KMS_ALIAS = ["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias"]
# What PynamoDB does to the ledger table (adapters/ledgers/dynamodb.py): never Scan,
# never a table-level change.
LEDGER_ACTIONS = [
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:DeleteItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:Query",
]
REVOCATION_DETAIL_TYPE = "Keycell Revocation"
EVENT_SOURCE = "keycell"


def cell_stack_name(cells: CellSet, cell: Cell) -> str:
    return f"{cells.name}-{cell.id}"


def global_stack_name(cells: CellSet) -> str:
    return f"{cells.name}-global"


def forwarder_role_name(cells: CellSet) -> str:
    return f"{cells.name}-event-forwarder"


def event_bus_arn(cells: CellSet, cell: Cell, account: str) -> str:
    return f"arn:aws:events:{cell.region}:{account}:event-bus/{cells.event_bus_name(cell)}"


class GlobalStack(cdk.Stack):
    """What the cells share: the event-forwarding role and the cell directory."""

    def __init__(self, scope: Construct, cells: CellSet, **kwargs: Any) -> None:
        super().__init__(scope, global_stack_name(cells), **kwargs)
        self.cells = cells
        aws_cells = cells.on("aws")
        self.forwarder = iam.Role(
            self,
            "EventForwarder",
            role_name=forwarder_role_name(cells),
            assumed_by=iam.ServicePrincipal("events.amazonaws.com"),
            description="EventBridge forwards a revocation from the cell where it was made to the other cells",
        )
        self.forwarder.add_to_policy(
            iam.PolicyStatement(
                actions=["events:PutEvents"],
                resources=[event_bus_arn(cells, c, self.account) for c in aws_cells],
            )
        )
        directory = {
            "name": cells.name,
            "trust_domain": cells.trust_domain,
            "cells": [
                {
                    "id": c.id,
                    "cloud": c.cloud,
                    "region": c.region,
                    "event_bus": cells.event_bus_name(c),
                    "ledger_table": cells.table_name(c),
                    "relay": f"{cells.relay_host(c)}:{c.relay_port}",
                }
                for c in cells.cells
            ],
        }
        ssm.StringParameter(
            self,
            "CellDirectory",
            parameter_name=f"/{cells.name}/cells",
            string_value=json.dumps(directory, sort_keys=True),
            description="The cells of this Keycell deployment (from infra/cells.toml)",
        )


class CellStack(cdk.Stack):
    """One regional cell. See the module docstring for what it holds."""

    def __init__(self, scope: Construct, cells: CellSet, cell: Cell, **kwargs: Any) -> None:
        if cell.cloud != "aws":
            raise ValueError(f"cell {cell.id} runs on {cell.cloud}; CellStack builds AWS cells")
        super().__init__(scope, cell_stack_name(cells, cell), **kwargs)
        self.cells = cells
        self.cell = cell

        self._keys()
        self._network()
        self._ledger()
        self._messaging()
        self._api()
        self._rotation()
        self._revocation()
        self._forwarding()
        self._relay()

    def _name(self, what: str) -> str:
        return self.cells.resource_name(self.cell, what)

    # --- keys ----------------------------------------------------------------------

    def _keys(self) -> None:
        self.ledger_key = kms.Key(
            self,
            "LedgerKey",
            alias=f"alias/{self._name('ledger')}",
            description=f"Encrypts the {self.cell.id} cell's ledger table at rest",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        self.ops_key = kms.Key(
            self,
            "OperationsKey",
            alias=f"alias/{self._name('operations')}",
            description=f"Encrypts the {self.cell.id} cell's logs, queues and function settings",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        # CloudWatch Logs encrypts log groups with it (the service needs the grant).
        self.ops_key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal(f"logs.{self.region}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{self.region}:{self.account}:log-group:*"
                    }
                },
            )
        )
        # EventBridge delivers to the encrypted revocation queue.
        self.ops_key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": self.account}},
            )
        )

    def _key_backend_statements(self, *, manage: bool) -> list[iam.PolicyStatement]:
        """The KMS actions of the `aws-kms` key backend, on Keycell's keys only: keys
        carrying the `keycell:name` tag, aliases under `alias/keycell/`."""
        keys = f"arn:aws:kms:{self.region}:{self.account}:key/*"
        aliases = f"arn:aws:kms:{self.region}:{self.account}:alias/keycell/*"
        tagged = {"Null": {"aws:ResourceTag/keycell:name": "false"}}
        statements = [iam.PolicyStatement(actions=KMS_USE, resources=[keys], conditions=tagged)]
        if manage:
            statements += [
                iam.PolicyStatement(
                    actions=["kms:CreateKey"],
                    resources=["*"],  # CreateKey has no resource; the tag condition bounds it
                    conditions={"Null": {"aws:RequestTag/keycell:name": "false"}},
                ),
                # CreateKey with Tags also needs TagResource, before the key carries any tag.
                iam.PolicyStatement(
                    actions=["kms:TagResource"],
                    resources=[keys],
                    conditions={"Null": {"aws:RequestTag/keycell:name": "false"}},
                ),
                iam.PolicyStatement(actions=KMS_MANAGE, resources=[keys], conditions=tagged),
                iam.PolicyStatement(actions=KMS_ALIAS, resources=[aliases, keys]),
                iam.PolicyStatement(actions=["kms:ListAliases", "kms:ListKeys"], resources=["*"]),
            ]
        return statements

    # --- network -------------------------------------------------------------------

    def _network(self) -> None:
        self.vpc = ec2.Vpc(
            self,
            "Network",
            vpc_name=self._name("network"),
            ip_addresses=ec2.IpAddresses.cidr(self.cell.cidr),
            max_azs=2,
            nat_gateways=2,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(
                    name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=22
                ),
            ],
            gateway_endpoints={
                "DynamoDB": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.DYNAMODB)
            },
        )
        flow_logs = self._log_group("FlowLogs", f"/{self.cells.name}/{self.cell.id}/vpc-flow")
        self.vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs))
        self.private = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.functions_sg = ec2.SecurityGroup(
            self,
            "FunctionsSecurityGroup",
            vpc=self.vpc,
            description="Keycell functions: outbound HTTPS to AWS APIs and the relays",
            allow_all_outbound=False,
        )
        self.functions_sg.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "AWS APIs over HTTPS")
        self.functions_sg.add_egress_rule(
            ec2.Peer.ipv4(self.cell.cidr),
            ec2.Port.tcp(self.cell.relay_port),
            "hand revocations to the relays",
        )

    def _log_group(self, construct_id: str, name: str) -> logs.LogGroup:
        return logs.LogGroup(
            self,
            construct_id,
            log_group_name=name,
            retention=_retention(self.cell.log_retention_days),
            encryption_key=self.ops_key,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )

    # --- ledger --------------------------------------------------------------------

    def _ledger(self) -> None:
        self.table = dynamodb.Table(
            self,
            "Ledger",
            table_name=self.cells.table_name(self.cell),
            partition_key=dynamodb.Attribute(name=ATTR_KIND, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=ATTR_PATH, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute=ATTR_EXPIRES_AT,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=self.ledger_key,
            deletion_protection=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )

    def _ledger_statements(self) -> list[iam.PolicyStatement]:
        return [
            iam.PolicyStatement(actions=LEDGER_ACTIONS, resources=[self.table.table_arn]),
            iam.PolicyStatement(
                actions=["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*", "kms:DescribeKey"],
                resources=[self.ledger_key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"dynamodb.{self.region}.amazonaws.com"}},
            ),
        ]

    def _environment(self) -> dict[str, str]:
        """What `keycell.functions.wiring` reads: this cell's ledger, keys and audit trail."""
        env = {
            "KEYCELL_CELL": self.cell.id,
            "KEYCELL_LEDGER": f"dynamodb://{self.cells.table_name(self.cell)}?region={self.cell.region}",
            "KEYCELL_KEY_BACKEND": "aws-kms",
            "KEYCELL_SEAL": "hsm",
            "KEYCELL_AUDIT_STDOUT": "1",
            "KEYCELL_EVENT_BUS": self.cells.event_bus_name(self.cell),
            "KEYCELL_RELAY": f"{self.cells.relay_host(self.cell)}:{self.cell.relay_port}",
        }
        return env

    # --- messaging -----------------------------------------------------------------

    def _queue(self, construct_id: str, name: str, *, dead_letters: sqs.IQueue | None = None) -> sqs.Queue:
        return sqs.Queue(
            self,
            construct_id,
            queue_name=self._name(name),
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.ops_key,
            enforce_ssl=True,
            retention_period=cdk.Duration.days(14),
            visibility_timeout=cdk.Duration.seconds(6 * self.cell.lambda_timeout_s),
            dead_letter_queue=None
            if dead_letters is None
            else sqs.DeadLetterQueue(queue=dead_letters, max_receive_count=5),
        )

    def _messaging(self) -> None:
        self.bus = events.EventBus(self, "EventBus", event_bus_name=self.cells.event_bus_name(self.cell))
        self.dead_letters = self._queue("DeadLetters", "dead-letters")
        self.revocations = self._queue("Revocations", "revocations", dead_letters=self.dead_letters)
        # Every revocation on this cell's bus, made here or forwarded from another cell.
        events.Rule(
            self,
            "RevocationsToQueue",
            event_bus=self.bus,
            event_pattern=events.EventPattern(source=[EVENT_SOURCE], detail_type=[REVOCATION_DETAIL_TYPE]),
            targets=[
                targets.SqsQueue(self.revocations, dead_letter_queue=self.dead_letters, retry_attempts=8)
            ],
        )

    # --- functions -----------------------------------------------------------------

    def _function_role(self, construct_id: str, what: str, statements: list[iam.PolicyStatement]) -> iam.Role:
        role = iam.Role(
            self,
            construct_id,
            role_name=self._name(f"{what}-{self.region}"),
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"Keycell {what} function of cell {self.cell.id}",
            managed_policies=[
                # ENIs in the cell's VPC and the function's own log streams; X-Ray traces.
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    "service-role/AWSLambdaVPCAccessExecutionRole"
                ),
                iam.ManagedPolicy.from_aws_managed_policy_name("AWSXRayDaemonWriteAccess"),
            ],
        )
        for statement in statements:
            role.add_to_policy(statement)
        # Function settings are encrypted with the operations key.
        role.add_to_policy(iam.PolicyStatement(actions=["kms:Decrypt"], resources=[self.ops_key.key_arn]))
        return role

    def _api(self) -> None:
        name = self._name("api")
        self.api_role = self._function_role(
            "ApiRole",
            "api",
            [
                *self._ledger_statements(),
                *self._key_backend_statements(manage=True),
                iam.PolicyStatement(actions=["events:PutEvents"], resources=[self.bus.event_bus_arn]),
            ],
        )
        self.api_logs = self._log_group("ApiFunctionLogs", f"/aws/lambda/{name}")
        self.access_logs = self._log_group("ApiAccessLogs", f"/{self.cells.name}/{self.cell.id}/api-access")
        with _chalice_environment(self.cell.region):
            self.chalice = self._chalice()
        self._finish_api(name)

    def _chalice(self) -> Chalice:
        return Chalice(
            self,
            "Api",
            source_dir=str(API_SOURCE),
            stage_config={
                "api_gateway_stage": API_STAGE,
                "api_gateway_endpoint_type": "REGIONAL",
                "manage_iam_role": False,
                "iam_role_arn": _ROLE_REPLACED_BELOW,
                "autogen_policy": False,
                "lambda_memory_size": self.cell.lambda_memory_mb,
                "lambda_timeout": self.cell.lambda_timeout_s,
                "reserved_concurrency": self.cell.api_reserved_concurrency,
                "xray": True,
                "environment_variables": self._environment(),
            },
        )

    def _finish_api(self, name: str) -> None:
        handler = self.chalice.get_resource("APIHandler")
        handler.add_property_override("FunctionName", name)
        handler.add_property_override("Role", self.api_role.role_arn)
        handler.add_property_override("KmsKeyArn", self.ops_key.key_arn)
        handler.add_property_override(
            "VpcConfig",
            {
                "SubnetIds": self.vpc.select_subnets(
                    subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS
                ).subnet_ids,
                "SecurityGroupIds": [self.functions_sg.security_group_id],
            },
        )
        handler.add_property_override(
            "DeadLetterQueue", {"Type": "SQS", "TargetArn": self.dead_letters.queue_arn}
        )
        handler.node.add_dependency(self.api_logs)
        self.api_role.add_to_policy(
            iam.PolicyStatement(actions=["sqs:SendMessage"], resources=[self.dead_letters.queue_arn])
        )
        self.api_role.add_to_policy(
            iam.PolicyStatement(
                actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[self.ops_key.key_arn]
            )
        )
        api = self.chalice.get_resource("RestAPI")
        skip_checks(
            api,
            CKV_AWS_120="no response cache: Vault responses belong to the token that asked "
            "(a cached secret read would be served to the next caller on the same path)",
        )
        api.add_property_override("TracingEnabled", True)
        api.add_property_override(
            "MethodSettings",
            [
                {
                    "ResourcePath": "/*",
                    "HttpMethod": "*",
                    "ThrottlingRateLimit": self.cell.api_rate_limit,
                    "ThrottlingBurstLimit": self.cell.api_burst,
                    "MetricsEnabled": True,
                    "LoggingLevel": "ERROR",
                    "DataTraceEnabled": False,  # request bodies carry secrets: never logged
                }
            ],
        )
        api.add_property_override(
            "AccessLogSetting",
            {
                "DestinationArn": self.access_logs.log_group_arn,
                "Format": json.dumps(
                    {
                        "requestId": "$context.requestId",
                        "ip": "$context.identity.sourceIp",
                        "method": "$context.httpMethod",
                        "path": "$context.resourcePath",
                        "status": "$context.status",
                        "latencyMs": "$context.responseLatency",
                    }
                ),
            },
        )
        self.api_function_name = name

    def _code(self) -> lambda_.Code:
        """The Chalice construct's deployment package, so every function ships the same code."""
        asset = self.chalice.node.find_child("ChaliceAppCode")
        assert isinstance(asset, s3_assets.Asset)
        return lambda_.Code.from_bucket(asset.bucket, asset.s3_object_key)

    def _function(self, construct_id: str, what: str, handler: str, role: iam.Role) -> lambda_.Function:
        name = self._name(what)
        if not handler_importable(handler):
            # The stack still synthesizes (the package is built separately), but a
            # deploy would ship a function whose handler cannot be imported.
            cdk.Annotations.of(self).add_warning_v2(
                f"keycell:handler-missing:{what}",
                f"{what} handler {handler!r} is not importable from this checkout; "
                f"set {what}_handler in the cell set to the function's dotted path",
            )
        role.add_to_policy(
            iam.PolicyStatement(actions=["sqs:SendMessage"], resources=[self.dead_letters.queue_arn])
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[self.ops_key.key_arn]
            )
        )
        return lambda_.Function(
            self,
            construct_id,
            function_name=name,
            code=self._code(),
            handler=handler,
            runtime=LAMBDA_RUNTIME,
            role=role,
            memory_size=self.cell.lambda_memory_mb,
            timeout=cdk.Duration.seconds(self.cell.lambda_timeout_s),
            environment=self._environment(),
            environment_encryption=self.ops_key,
            reserved_concurrent_executions=max(1, self.cell.api_reserved_concurrency // 4),
            tracing=lambda_.Tracing.ACTIVE,
            vpc=self.vpc,
            vpc_subnets=self.private,
            security_groups=[self.functions_sg],
            dead_letter_queue=self.dead_letters,
            log_group=self._log_group(f"{construct_id}Logs", f"/aws/lambda/{name}"),
        )

    def _rotation(self) -> None:
        secrets = f"arn:aws:secretsmanager:{self.region}:{self.account}:secret:{self.cells.name}/*"
        role = self._function_role(
            "RotationRole",
            "rotation",
            [
                *self._ledger_statements(),
                *self._key_backend_statements(manage=False),
                # Secrets Manager rotation steps on this deployment's secrets only.
                iam.PolicyStatement(
                    actions=[
                        "secretsmanager:DescribeSecret",
                        "secretsmanager:GetSecretValue",
                        "secretsmanager:PutSecretValue",
                        "secretsmanager:UpdateSecretVersionStage",
                    ],
                    resources=[secrets],
                ),
                iam.PolicyStatement(actions=["secretsmanager:GetRandomPassword"], resources=["*"]),
            ],
        )
        self.rotation_fn = self._function("Rotation", "rotation", self.cell.rotation_handler, role)
        # Secrets Manager invokes it as a rotation Lambda, for this account's secrets only.
        self.rotation_fn.add_permission(
            "SecretsManagerRotation",
            principal=iam.ServicePrincipal("secretsmanager.amazonaws.com"),
            source_account=self.account,
        )
        for schedule in self.cell.rotation_schedules:
            events.Rule(
                self,
                f"Rotate-{schedule.name}",
                rule_name=self._name(f"rotate-{schedule.name}"),
                description=f"Rotate {schedule.prefix or 'everything'} in cell {self.cell.id}",
                schedule=events.Schedule.expression(schedule.expression),
                targets=[
                    targets.LambdaFunction(
                        self.rotation_fn,
                        # A scheduled event, with what to rotate in its detail.
                        event=events.RuleTargetInput.from_object(
                            {
                                "version": "0",
                                "id": events.EventField.event_id,
                                "detail-type": "Scheduled Event",
                                "source": "aws.events",
                                "time": events.EventField.time,
                                "region": self.region,
                                "resources": [f"rule/{self._name(f'rotate-{schedule.name}')}"],
                                "detail": {"schedule": schedule.name, "prefix": schedule.prefix},
                            }
                        ),
                        dead_letter_queue=self.dead_letters,
                        retry_attempts=4,
                    )
                ],
            )

    def _revocation(self) -> None:
        role = self._function_role(
            "RevocationRole",
            "revocation",
            [*self._ledger_statements(), *self._key_backend_statements(manage=False)],
        )
        self.revocation_fn = self._function("Revocation", "revocation", self.cell.revocation_handler, role)
        self.revocation_fn.add_event_source(
            sources.SqsEventSource(self.revocations, batch_size=10, report_batch_item_failures=True)
        )

    def _forwarding(self) -> None:
        """Revocations made here go to every other AWS cell's bus (the relays' gossip is
        the fast path; this is the durable one). Only events that originate here are
        forwarded, so nothing comes back."""
        peers = [c for c in self.cells.on("aws") if c.id != self.cell.id]
        if not peers:
            return
        role = iam.Role.from_role_name(self, "Forwarder", forwarder_role_name(self.cells), mutable=False)
        events.Rule(
            self,
            "ForwardRevocations",
            event_bus=self.bus,
            event_pattern=events.EventPattern(
                source=[EVENT_SOURCE],
                detail_type=[REVOCATION_DETAIL_TYPE],
                detail={"origin_cell": [self.cell.id]},
            ),
            targets=[
                targets.EventBus(
                    events.EventBus.from_event_bus_arn(
                        self, f"Peer-{peer.id}", event_bus_arn(self.cells, peer, self.account)
                    ),
                    role=role,
                    dead_letter_queue=self.dead_letters,
                )
                for peer in peers
            ],
        )

    def _access_log_bucket(self) -> s3.Bucket:
        """Where the load balancer writes its access logs (S3-managed keys: the only
        encryption ELB log delivery accepts)."""
        bucket = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[s3.LifecycleRule(expiration=cdk.Duration.days(self.cell.log_retention_days))],
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        cfn = bucket.node.default_child
        assert isinstance(cfn, cdk.CfnResource)
        skip_checks(cfn, CKV_AWS_18="this bucket is the access-log destination; logging it would log itself")
        return bucket

    # --- relay ---------------------------------------------------------------------

    def _relay(self) -> None:
        cell = self.cell
        cluster = ecs.Cluster(
            self,
            "Cluster",
            cluster_name=self._name("cluster"),
            vpc=self.vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
        )
        task_role = iam.Role(
            self,
            "RelayTaskRole",
            role_name=self._name(f"relay-{self.region}"),
            assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description=f"Keycell relay of cell {cell.id}: applies revocations to its ledger",
        )
        for statement in [*self._ledger_statements(), *self._key_backend_statements(manage=False)]:
            task_role.add_to_policy(statement)
        task = ecs.FargateTaskDefinition(
            self,
            "RelayTask",
            family=self._name("relay"),
            cpu=cell.relay_cpu,
            memory_limit_mib=cell.relay_memory_mb,
            task_role=task_role,
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
        )
        peers = relay_peers(self.cells, cell)
        tls_secrets: dict[str, ecs.Secret] | None = None
        if cell.relay_tls_secret:  # mTLS between relays (keycell/relay/tls.py)
            tls_secret = secretsmanager.Secret.from_secret_name_v2(self, "RelayTls", cell.relay_tls_secret)
            tls_secrets = {
                env: ecs.Secret.from_secrets_manager(tls_secret, field)
                for env, field in RELAY_TLS_FIELDS.items()
            }
        task.add_container(
            "relay",
            image=ecs.ContainerImage.from_registry(cell.relay_image),
            command=["keycell", "relay"],
            environment={
                **self._environment(),
                "KEYCELL_RELAY_LISTEN": f"0.0.0.0:{cell.relay_port}",
                "KEYCELL_RELAY_PEERS": ",".join(peers),
                "KEYCELL_RELAY_PROFILE": "wan",
            },
            secrets=tls_secrets,
            port_mappings=[ecs.PortMapping(container_port=cell.relay_port, protocol=ecs.Protocol.TCP)],
            readonly_root_filesystem=True,
            user="10001",
            logging=ecs.LogDrivers.aws_logs(
                stream_prefix="relay",
                log_group=self._log_group("RelayLogs", f"/{self.cells.name}/{cell.id}/relay"),
            ),
            stop_timeout=cdk.Duration.seconds(30),
        )
        relay_sg = ec2.SecurityGroup(
            self,
            "RelaySecurityGroup",
            vpc=self.vpc,
            description="Keycell relays: gRPC from the relays of every cell",
            allow_all_outbound=False,
        )
        # Relays of every cell dial in through the load balancer; the streams are mutual
        # TLS with SPIFFE identities, so reaching the port proves nothing by itself.
        relay_sg.add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(cell.relay_port), "relays of all cells")
        relay_sg.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(cell.relay_port), "relays of other cells")
        relay_sg.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "AWS APIs over HTTPS")
        self.relay_service = ecs.FargateService(
            self,
            "Relay",
            service_name=self._name("relay"),
            cluster=cluster,
            task_definition=task,
            desired_count=cell.relays,
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True),
            assign_public_ip=False,
            vpc_subnets=self.private,
            security_groups=[relay_sg],
            platform_version=ecs.FargatePlatformVersion.LATEST,
        )
        self.relay_lb = elbv2.NetworkLoadBalancer(
            self,
            "RelayLoadBalancer",
            load_balancer_name=self._name("relay"),
            vpc=self.vpc,
            internet_facing=True,
            cross_zone_enabled=True,
            deletion_protection=True,
        )
        self.relay_lb.log_access_logs(self._access_log_bucket(), prefix="relay-nlb")
        listener = self.relay_lb.add_listener("Relay", port=cell.relay_port, protocol=elbv2.Protocol.TCP)
        listener.add_targets(
            "Relays",
            port=cell.relay_port,
            protocol=elbv2.Protocol.TCP,
            targets=[self.relay_service],
            health_check=elbv2.HealthCheck(protocol=elbv2.Protocol.TCP),
        )
        if self.cells.hosted_zone_id:
            zone = route53.HostedZone.from_hosted_zone_attributes(
                self, "Zone", hosted_zone_id=self.cells.hosted_zone_id, zone_name=self.cells.dns_zone
            )
            route53.ARecord(
                self,
                "RelayRecord",
                zone=zone,
                record_name=self.cells.relay_host(cell),
                target=route53.RecordTarget.from_alias(route53_targets.LoadBalancerTarget(self.relay_lb)),
            )


def handler_importable(handler: str) -> bool:
    """Does `package.module.function` name a function this checkout can import?"""
    module_name, _, attribute = handler.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    return callable(getattr(module, attribute, None))


@contextlib.contextmanager
def _chalice_environment(region: str) -> Iterator[None]:
    """Packaging runs with the cell's region (`chalice package` asks boto for one, only
    to name service principals) and leaves the process environment as it found it:
    loading the app, Chalice copies the stage's environment variables (the cell's
    KEYCELL_LEDGER, KEYCELL_SEAL, ...) into `os.environ`."""
    saved = dict(os.environ)
    os.environ["AWS_DEFAULT_REGION"] = region
    try:
        yield
    finally:
        # Undo only what changed: clearing and refilling the whole environment would
        # unset and set again variables that native libraries keep pointers into
        # (SoftHSM2 holds on to SOFTHSM2_CONF's value; it then fails to list tokens).
        for name in [n for n in os.environ if n not in saved]:
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def skip_checks(resource: cdk.CfnResource, **reasons: str) -> None:
    """Tell checkov why a check does not apply to `resource` (the reason is required)."""
    resource.add_metadata("checkov", {"skip": [{"id": k, "comment": v} for k, v in reasons.items()]})


def _retention(days: int) -> logs.RetentionDays:
    """The longest CloudWatch retention that does not exceed `days` (at least one day)."""
    allowed = sorted(
        (r for r in logs.RetentionDays if r.value != logs.RetentionDays.INFINITE.value), key=_days
    )
    chosen = allowed[0]
    for option in allowed:
        if _days(option) <= days:
            chosen = option
    return chosen


def _days(option: logs.RetentionDays) -> int:
    return int(option.value) if str(option.value).isdigit() else 10**6


def build_app(cells: CellSet, app: cdk.App | None = None) -> tuple[cdk.App, GlobalStack, list[CellStack]]:
    """The whole AWS deployment: the global stack in the home region and one stack per AWS cell."""
    app = app or cdk.App()
    account = cells.account or None

    def env(region: str) -> cdk.Environment:
        return cdk.Environment(account=account, region=region)

    global_stack = GlobalStack(app, cells, env=env(cells.home_region))
    stacks = []
    for cell in cells.on("aws"):
        stack = CellStack(app, cells, cell, env=env(cell.region))
        stack.add_stack_dependency(global_stack)  # the forwarding role exists before any rule uses it
        stacks.append(stack)
    return app, global_stack, stacks
