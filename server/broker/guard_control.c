/*
 * guard_control: the provisioning_guard plugin's control topic (server listener only).
 *
 * $CONTROL/provisioning-guard/v1 (acl-server grants it to the server identity alone):
 * payload lines "token T", "user ID" + "topic <access> <topic>" (rights blocks),
 * "kick ID", "kick-birth ID", "reload", "stats"; see provisioning_guard.c for what each
 * does. Blocks are applied at once, then the kicks, then "done T" is answered - or, with
 * "reload", the kicks and the answer wait for Mosquitto's reload event.
 */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#include "device_rights.h"
#include "guard.h"

#define MAX_TOKEN 64
#define MAX_PENDING 100000

unsigned long guard_file_loads;
static unsigned long blocks_applied;

/* ``entry`` is "o<id>" (operational and birth sessions) or "b<id>" (birth sessions only). */
static void kick(const char *entry)
{
	char birth[MAX_ID + 4];
	const char *id = entry + 1;
	snprintf(birth, sizeof(birth), "CN=%s", id);
	if(entry[0] == 'o') mosquitto_kick_client_by_username(id, false);
	mosquitto_kick_client_by_username(birth, false);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "provisioning_guard: disconnected the %ssessions of %s",
			entry[0] == 'o' ? "" : "birth ", id);
}

static void respond(const char *token)
{
	char payload[MAX_TOKEN + 8];
	int len = snprintf(payload, sizeof(payload), "done %s", token);
	mosquitto_broker_publish_copy(NULL, RESPONSE_TOPIC, len, payload, 0, false, NULL);
}

/* "stats T loads=N blocks=M devices=D": how often the rights file was read (start and
 * reloads), how many device blocks came over this topic, and the table's size now. */
static void respond_stats(const char *token)
{
	char payload[MAX_TOKEN + 96];
	int len = snprintf(payload, sizeof(payload), "stats %s loads=%lu blocks=%lu devices=%zu",
			token, guard_file_loads, blocks_applied, rights_device_count());
	mosquitto_broker_publish_copy(NULL, RESPONSE_TOPIC, len, payload, 0, false, NULL);
}

static bool push(char ***list, size_t *count, const char *value)
{
	if(*count >= MAX_PENDING) return false;
	char **grown = realloc(*list, (*count + 1) * sizeof(char *));
	if(grown == NULL) return false;
	*list = grown;
	grown[*count] = strdup(value);
	if(grown[*count] == NULL) return false;
	(*count)++;
	return true;
}

/* "kick ID" -> "oID", "kick-birth ID" -> "bID"; false for anything else. */
static bool kick_entry(const char *line, char *entry, size_t size)
{
	const char *id;
	char kind;
	if(!strncmp(line, "kick ", 5)){
		id = line + 5;
		kind = 'o';
	}else if(!strncmp(line, "kick-birth ", 11)){
		id = line + 11;
		kind = 'b';
	}else{
		return false;
	}
	if(!rights_valid_id(id, strlen(id))) return false;
	snprintf(entry, size, "%c%s", kind, id);
	return true;
}

static void clear(char ***list, size_t *count)
{
	for(size_t i = 0; i < *count; i++) free((*list)[i]);
	free(*list);
	*list = NULL;
	*count = 0;
}

/* Rights blocks of a control message: "user ID" starts one, its "topic" lines follow; any
 * other line ends it. Each block replaces its device's entry as soon as it is complete. */
struct block_reader {
	struct device_rights *block;
	bool skipping; /* after a malformed "user" line: its topic lines belong to nobody */
	size_t applied;
};

static void block_end(struct block_reader *reader)
{
	if(reader->block){
		rights_block_commit(reader->block);
		reader->applied++;
	}
	reader->block = NULL;
	reader->skipping = false;
}

/* True if ``line`` was a rights line (used or logged). */
static bool block_line(struct block_reader *reader, const char *line)
{
	if(!strncmp(line, "user ", 5)){
		block_end(reader);
		reader->block = rights_block_new(line + 5);
		if(reader->block == NULL){
			reader->skipping = true;
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					"provisioning_guard: control: a user line without a valid device id ignored");
		}
		return true;
	}
	if(strncmp(line, "topic ", 6)) return false;
	if(reader->block == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "provisioning_guard: control: %s",
				reader->skipping ? "topic line of an invalid user ignored"
				: "topic line outside a user block ignored");
	}else if(!rights_block_add(reader->block, line)){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"provisioning_guard: control: malformed topic line: the device has no rights");
	}
	return true;
}

int guard_on_control(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	struct mosquitto_evt_control *ed = event_data;
	(void)event;

	char *text = strndup(ed->payload, ed->payloadlen);
	if(text == NULL) return MOSQ_ERR_NOMEM;
	char *token = NULL;
	bool reload = false, stats = false;
	char *save = NULL;
	char **kicks = NULL;
	size_t kick_count = 0;
	char entry[MAX_ID + 2];
	struct block_reader reader = {NULL, false, 0};
	for(char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)){
		if(block_line(&reader, line)) continue;
		block_end(&reader);
		if(!strncmp(line, "token ", 6) && rights_valid_id(line + 6, strlen(line + 6))){
			token = line + 6;
		}else if(!strcmp(line, "reload")){
			reload = true;
		}else if(!strcmp(line, "stats")){
			stats = true;
		}else if(kick_entry(line, entry, sizeof(entry))){
			if(!push(&kicks, &kick_count, entry)) break;
		}else{
			mosquitto_log_printf(MOSQ_LOG_WARNING, "provisioning_guard: ignored a control line");
		}
	}
	block_end(&reader);
	blocks_applied += reader.applied;
	if(reader.applied){
		mosquitto_log_printf(MOSQ_LOG_INFO,
				"provisioning_guard: %zu device rights replaced without a reload", reader.applied);
	}
	if(stats && token) respond_stats(token);
	if(reload){
		/* Mosquitto's own SIGHUP handler sets its reload flag; the reload runs before the
		 * broker reads any more packets, and on_reload finishes this message's work. */
		for(size_t i = 0; i < kick_count; i++){
			push(&guard->pending_kicks, &guard->kick_count, kicks[i]);
		}
		if(token) push(&guard->pending_tokens, &guard->token_count, token);
		raise(SIGHUP);
	}else{
		for(size_t i = 0; i < kick_count; i++) kick(kicks[i]);
		if(token) respond(token);
	}
	clear(&kicks, &kick_count);
	free(text);
	return MOSQ_ERR_SUCCESS;
}

int guard_on_reload(int event, void *event_data, void *userdata)
{
	struct guard *guard = userdata;
	(void)event;
	(void)event_data;

	for(size_t i = 0; i < guard->kick_count; i++) kick(guard->pending_kicks[i]);
	for(size_t i = 0; i < guard->token_count; i++) respond(guard->pending_tokens[i]);
	guard_clear_pending(guard);
	return MOSQ_ERR_PLUGIN_DEFER; /* let other reload handlers run */
}

void guard_clear_pending(struct guard *guard)
{
	clear(&guard->pending_kicks, &guard->kick_count);
	clear(&guard->pending_tokens, &guard->token_count);
}

