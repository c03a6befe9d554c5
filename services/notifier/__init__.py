"""Alert delivery: regression alerts to webhooks, Slack/Mattermost and NATS subjects (docs/alerts.md)."""
