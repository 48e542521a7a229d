-- outbox_checkpoint is shared by every outbox of the database: its columns
-- stay for the others (migration 1's down removes the table with the last).
SELECT 1;
