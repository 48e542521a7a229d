DROP PUBLICATION IF EXISTS {{.Publication}};
{{- if .DropCheckpoint}}
DROP TABLE IF EXISTS outbox_checkpoint;
{{- end}}
DROP TABLE IF EXISTS {{.Outbox}};
